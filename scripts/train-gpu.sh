#!/usr/bin/env bash
# Train a preset on a CUDA host in one chunk, resumable, and leave the weights where a lent GPU
# machine returns them: fp16 parts under 16 MiB in $OUT (join them here with
# `python -m phisearch.indexer.model.parts join $OUT/model.part*.safetensors DEST.safetensors`).
#
#   MINUTES=8 PRESET=paper64 OUT=$OUT bash scripts/train-gpu.sh
#
# The run folder ($RUN, default runs/$PRESET) keeps the full state (fp32 weights, Adam, noise
# generator): a second chunk on the same (still warm) machine resumes it exactly. A cold machine
# starts from WARM (a checkpoint to warm-start from, e.g. the joined parts of the last chunk).
# On CUDA: bf16 autocast, channels_last, torch.compile, the training set decoded once and held
# on the GPU (--resident), flips and crops on the GPU. Data: $PHISEARCH_DATA/imagenette-64.
# CI runs this on the CPU with PRESET=tiny STEPS=3 DEVICE=cpu (tests/test_train_gpu_script.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PRESET=${PRESET:-paper64}
RUN=${RUN:-runs/$PRESET}
OUT=${OUT:-runs/$PRESET-out}
DATA=${PHISEARCH_DATA:-../shared/data}/imagenette-64
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
LENGTH=(--minutes "${MINUTES:-8}")
[ -n "${STEPS:-}" ] && LENGTH=(--steps "$STEPS")
WARMSTART=()
[ -n "${WARM:-}" ] && [ ! -f "$RUN/model.safetensors" ] && WARMSTART=(--resume "$WARM")
COMPILE=--compile
[ "$DEVICE" = cpu ] && COMPILE=--no-compile
PYTHONUNBUFFERED=1 "$PY" -m phisearch.ui -v train \
  --data "$DATA/imagenette-train-{000000..000009}.tar" --test-data "$DATA/imagenette-test-000000.tar" \
  --out "$RUN" --preset "$PRESET" "${LENGTH[@]}" "${WARMSTART[@]}" --device "$DEVICE" \
  --batch-size "${BATCH:-256}" --lr "${LR:-1e-3}" --resident "$COMPILE" --workers 0 \
  --save-every-minutes "${SAVE_EVERY:-2}" --eval-every-minutes "${EVAL_EVERY:-2}" \
  2>&1 | tee "$OUT/train.log"
cp "$RUN/train_log.jsonl" "$OUT/" 2>/dev/null || true
"$PY" -m phisearch.indexer.model.parts split "$RUN/model.safetensors" "$OUT" --max-mb 15
