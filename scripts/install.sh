#!/usr/bin/env bash
# Creates .venv (if missing) and installs phisearch into it, editable, with its test tools.
# torch: a CPU host gets the CPU build (torch==2.13.0, see docs); a GPU host that installed its
# CUDA torch into .venv first keeps it, because the project only asks for torch>=2.3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.13.0
fi
# pip's own exit status decides (the filter only hides the mirror's noisy location warnings).
if ! .venv/bin/pip install -q -e ".[dev]" 2> >(grep -v "^WARNING: Location" >&2); then
  echo "install.sh: pip install -e .[dev] failed (see above)" >&2
  exit 1
fi
.venv/bin/python -c "import torch, qdrant_edge, hdbscan, umap, phisearch.indexer.model.unet" >/dev/null
# The browser test of the UI drives Debian's chromium (Playwright's own browser download is never
# used). Installed only as root and only when missing; otherwise that test skips, saying why.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
