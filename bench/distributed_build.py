"""Distributed `idx build` scaling: one process vs torchrun with 1, 2, ... ranks on the same
shards, checkpoint and φ settings, each into a fresh Edge store. Reports img/s per configuration
(both the build's own rate and the wall clock including process start-up) and the speed-up of
each rank count over 1 rank.

    python bench/distributed_build.py                      # small64, 4 imagenette train shards
    python bench/distributed_build.py --nproc 1 2 4 --device cuda --data '<...>-{000000..000009}.tar'

On CPU the cores are divided between the ranks (OMP_NUM_THREADS = cores // ranks), so the ratio
shows what splitting buys over one process using all threads; on GPUs each rank gets its own GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = os.environ.get("PHISEARCH_DATA", "../shared/data")


def run(name: str, launcher: list[str], build_args: list[str], threads: int) -> dict:
    """One configuration in a fresh store: the build's --json summary plus the wall clock."""
    with tempfile.TemporaryDirectory(prefix="phisearch-dist-bench-") as tmp:
        env = dict(os.environ, PHISEARCH_NO_PROGRESS="1", OMP_NUM_THREADS=str(threads),
                   MKL_NUM_THREADS=str(threads))
        t0 = time.perf_counter()
        r = subprocess.run(launcher + ["-m", "phisearch.ui", "build"] + build_args
                           + ["--store", tmp, "--json"], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{name} failed:\n{r.stderr[-3000:]}")
    s = json.loads(r.stdout)
    row = {"indexed": s["indexed"], "img_per_s": s["img_per_s"], "build_seconds": s["seconds"],
           "wall_seconds": round(wall, 2), "wall_img_per_s": round(s["indexed"] / wall, 2),
           "threads_per_rank": threads, "stages": s["stages"], "ranks": s.get("ranks")}
    print(f"{name:>12}: {row['img_per_s']:8.1f} img/s in the build, {row['wall_img_per_s']:8.1f} "
          f"img/s wall ({s['indexed']} images, {wall:.1f} s)", file=sys.stderr)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+",
                    default=[f"{DATA}/imagenette-64/imagenette-train-{{000000..000003}}.tar"])
    ap.add_argument("--checkpoint", default="small64")
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--sigma", type=float, default=0.2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1, help="decoding processes per rank")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="rank counts to run")
    ap.add_argument("--no-single", action="store_true",
                    help="skip the plain single-process build")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                    help="CPU threads to divide between the ranks")
    ap.add_argument("--out", default="bench/results/distributed_build.json")
    args = ap.parse_args()

    build_args = ["--checkpoint", args.checkpoint, "--sigma", str(args.sigma),
                  "--draws", str(args.draws), "--batch-size", str(args.batch_size),
                  "--workers", str(args.workers), "--device", args.device]
    for d in args.data:
        build_args += ["--data", d]
    configs: dict[str, dict] = {}
    if not args.no_single:
        configs["single"] = run("single", [sys.executable], build_args, args.cores)
    for n in args.nproc:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", str(n)]
        configs[f"torchrun-{n}"] = run(f"torchrun-{n}", launcher, build_args + ["--distributed"],
                                       max(1, args.cores // n))
    base = configs.get(f"torchrun-{min(args.nproc)}")
    ratios = {name: round(c["img_per_s"] / base["img_per_s"], 3)
              for name, c in configs.items() if base and base["img_per_s"]}
    import torch

    result = {
        "checkpoint": args.checkpoint, "data": args.data, "device": args.device,
        "cuda_devices": torch.cuda.device_count(), "sigma": args.sigma, "draws": args.draws,
        "batch_size": args.batch_size, "workers_per_rank": args.workers,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "cores_used": args.cores,
                 "torch": torch.__version__},
        "configs": configs,
        "ratio_vs_min_nproc": ratios,
        "img_per_s": {name: c["img_per_s"] for name, c in configs.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"img_per_s": result["img_per_s"], "ratio_vs_min_nproc": ratios}))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
