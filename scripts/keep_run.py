"""Keep a training run in the repository, or put it back: a session's checkout starts without
runs/ (ignored by git), so a run that must outlive the session is copied to kept/NAME/ and
committed: weights, moving average, Adam's state and counters (safetensors and JSON).

    python scripts/keep_run.py save runs/line       # -> kept/line/, then git add kept/line
    python scripts/keep_run.py restore runs/line    # kept/line/ -> runs/line/, resume exactly
"""

import argparse
import sys
from pathlib import Path

from phisearch.indexer.train.state import keep, restore

KEPT = Path(__file__).resolve().parent.parent / "kept"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("save", "restore"))
    ap.add_argument("run", type=Path, help="the run folder, e.g. runs/line")
    ap.add_argument("--name", help="kept/NAME (default: the run folder's name)")
    a = ap.parse_args()
    kept = KEPT / (a.name or a.run.name)
    try:
        if a.action == "save":
            print(f"{kept}: step {keep(a.run, kept)}")
        else:
            print(f"{a.run}: restored at step {restore(kept, a.run)}")
    except (FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
