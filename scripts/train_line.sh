#!/usr/bin/env bash
# The Tiny ImageNet line after decision 6 (docs/model-card.md): a warm start from the shipped
# small64 (69,079 steps), --sigma-dist wide, cosine 1e-4 -> 0 over 18,000 steps to 87,079,
# moving average 0.999, both cores, in the background. Rerun the same command to resume: from
# OUT when it holds the run, else from kept/NAME (committed by scripts/keep_run.py save).
#   bash scripts/train_line.sh          # OUT=runs/line, log runs/logs/line.log
# At 87,079 steps, ship it under the rule (counting Tiny CPU time from the Imagenette-only model,
# whose train_cpu_seconds were 8,320.2), then remake what the docs quote:
#   OMP_NUM_THREADS=1 .venv/bin/python scripts/ship_tiny.py --run runs/line --weights ema \
#       --origin-cpu-seconds 8320.2 --train-note "..." > runs/logs/ship.log
#   bash scripts/after_ship.sh 87079
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/line}
T=${PHISEARCH_DATA:-../shared/data}/tinyimagenet-64
mkdir -p runs/logs
if [ ! -f "$OUT/model.safetensors" ] && [ -f "kept/$(basename "$OUT")/model.safetensors" ]; then
  .venv/bin/python scripts/keep_run.py restore "$OUT"
fi
RESUME=()
[ -f "$OUT/model.safetensors" ] || RESUME=(--resume small64)
OMP_NUM_THREADS=${THREADS:-2} nohup .venv/bin/idx train \
  --data "$T/tinyimagenet-train-{000000..000088}.tar.gz" --out "$OUT" "${RESUME[@]}" \
  --ema 0.999 --lr 1e-4 --lr-schedule cosine --warmup-steps 300 --schedule-steps 18000 \
  --steps 87079 --sigma-dist wide --save-every-minutes 5 --compile >> runs/logs/line.log 2>&1 &
echo "training in the background: pid $!, log runs/logs/line.log"
