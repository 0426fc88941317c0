#!/usr/bin/env bash
# The main job on the embedded default: install, then index every imagenette train and test
# shard into the default Qdrant Edge store (~/.phisearch/store, or $PHISEARCH_STORE).
# Rerunning resumes: finished shards are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
DATA=${PHISEARCH_DATA:-../shared/data}/imagenette-64
.venv/bin/idx build --data "$DATA/imagenette-train-{000000..000009}.tar" \
                   --data "$DATA/imagenette-test-{000000..000003}.tar" "$@"
.venv/bin/idx status
