#!/usr/bin/env bash
# The test command: installs what is missing, then runs the suite (slow tests excluded unless
# PHISEARCH_SLOW=1, which .ci/run sets). Server tests run when QDRANT_URL is set and skip,
# saying why, otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
MARK="not slow and not gpu"
[ "${PHISEARCH_SLOW:-0}" = "1" ] && MARK="not gpu"
exec .venv/bin/pytest -q -m "$MARK" "$@"
