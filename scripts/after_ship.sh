#!/usr/bin/env bash
# After scripts/ship_tiny.py ships a model: remake what the README and docs quote with it.
#   bash scripts/after_ship.sh STEP      # e.g. 87079; logs to runs/logs/after_ship_STEP.log
# 1. the main job's index from scratch (the old store is moved aside, not deleted) and its
#    clusters -> bench/results/cluster_main_small64_STEP.json (the README quotes it);
# 2. reconstruction fidelity on both sets, each against an index built with the new model
#    (Imagenette train 0-4; Tiny ImageNet train 0-9) -> bench/results/recon_fidelity{,_tiny}_STEP.json;
# 3. the UI screenshots -> docs/screenshots/.
set -euo pipefail
cd "$(dirname "$0")/.."
STEP=${1:?usage: bash scripts/after_ship.sh STEP}
D=${PHISEARCH_DATA:-../shared/data}
N=$D/imagenette-64
T=$D/tinyimagenet-64
STORE=${PHISEARCH_STORE:-$HOME/.phisearch/store}
IDX=.venv/bin/idx
R=bench/results
if [ -e "$STORE" ] && [ ! -e "$STORE.before-$STEP" ]; then mv "$STORE" "$STORE.before-$STEP"; fi
bash scripts/index-imagenette.sh
$IDX cluster --json > "$R/cluster_main_small64_$STEP.json"
$IDX build --store "runs/recon-store-$STEP" --data "$N/imagenette-train-{000000..000004}.tar"
.venv/bin/python bench/recon_fidelity.py --store "runs/recon-store-$STEP" \
  --queries "$N/imagenette-test-000000.tar" --targets 50 -n 4 --out "$R/recon_fidelity_$STEP.json"
$IDX build --store "runs/recon-store-tiny-$STEP" --data "$T/tinyimagenet-train-{000000..000009}.tar.gz"
.venv/bin/python bench/recon_fidelity.py --store "runs/recon-store-tiny-$STEP" \
  --queries "$T/tinyimagenet-val-{000000..000010}.tar.gz" --targets 50 -n 4 \
  --out "$R/recon_fidelity_tiny_$STEP.json"
.venv/bin/python scripts/ui_screenshots.py --image n03445777_10862
echo "after_ship $STEP: done"
