"""Branch a training run: DST continues SRC exactly (weights, moving average, Adam state, CPU
time) with its own lr schedule from the branch step (issue 26's recipe decisions).

    python scripts/branch_run.py runs/tiny-warm runs/tiny-warm-cos
    idx train --data ... --out runs/tiny-warm-cos --lr 3e-4 --lr-schedule cosine \
        --warmup-steps 300 --schedule-steps 12000 --ema 0.999

Copy SRC while its trainer is stopped or between saves (it writes each file atomically).
"""

import argparse
import sys

from phisearch.indexer.train.state import branch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    a = ap.parse_args()
    try:
        meta = branch(a.src, a.dst)
    except (FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{a.dst}: branched at step {meta.get('step')}, "
          f"{meta.get('cpu_seconds', 0) / 60:.1f} CPU-minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
