"""Equal CPU time, same initialisation: does a cheaper network reach a better φ per CPU-minute?

small64 spends about 77% of a training pass in its decoder (5/6/7 convs), which φ never uses.
This trains small64 and small64-dec2 (decoder 2/2/2; the same seed, so the encoder and middle
block start from identical weights) side by side, one thread each, for the same wall-clock
minutes on an otherwise idle machine, then scores every learning-curve snapshot of both on
validation queries (imagenette test-000001) against a train gallery: the paper's φ (`mid` raw)
kNN@10, the default readout's (`blocks+white128+l2`, whitened on the gallery) and the same
network untrained, plus PSNR at σ 0.1 on 256 test images. One draw per image (σ 0.2) to keep the
scoring cheap; every row is scored the same way.

    .venv/bin/python bench/arch_experiment.py --minutes 30
Writes bench/results/arch_experiment.json and docs/arch_experiment.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from phisearch.indexer.model import checkpoint as ckpt
from phisearch.indexer.train.denoise_eval import denoise_eval
from phisearch.indexer.train.loop import load_images
from phisearch.search.evaluate import EvalSettings, evaluate

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("PHISEARCH_DATA", REPO.parent / "shared" / "data")) / "imagenette-64"
PRESETS = ("small64", "small64-dec2")
READOUT = "blocks+white128+l2"


def train_both(root: Path, minutes: float, seed: int) -> dict[str, float]:
    """Both runs at once, one thread each; returns each run's start time."""
    procs, starts = {}, {}
    for name in PRESETS:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PHISEARCH_NO_PROGRESS="1")
        starts[name] = time.time()
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "phisearch.ui", "train", "--preset", name,
             "--data", str(DATA / "imagenette-train-{000000..000009}.tar"),
             "--out", str(root / name), "--minutes", str(minutes), "--lr", "1e-3",
             "--dtype", "fp32", "--seed", str(seed), "--workers", "1"],
            env=env, stdout=subprocess.DEVNULL, stderr=open(root / f"{name}.log", "w"))
    for name, p in procs.items():
        if p.wait() != 0:
            raise SystemExit(f"training {name} failed: see {root / name}.log")
    return starts


def score(path: Path, test_images: np.ndarray, limit_q: int, limit_g: int) -> dict:
    c = ckpt.load(path)
    st = EvalSettings(sigma=0.2, draws=1, extra=(), readouts=("mid", READOUT),
                      limit_queries=limit_q, limit_gallery=limit_g)
    r = evaluate(c, str(DATA / "imagenette-test-000001.tar"),
                 str(DATA / "imagenette-train-{000000..000001}.tar"), READOUT, st)
    reps = r["representations"]
    psnr = denoise_eval(c.model, test_images, sigmas=(0.1,))["0.1"]["denoised"]
    return {"steps": c.info.get("steps", 0), "images_seen": c.info.get("images_seen", 0),
            "psnr_0_1": psnr, "phi_mid_knn10": reps["phi_mid_raw"]["knn@10"],
            "untrained_mid_knn10": reps["random_init_mid_raw"]["knn@10"],
            "readout_knn10": reps["phi"]["knn@10"],
            "untrained_readout_knn10": reps["random_init"]["knn@10"],
            "pixels16_knn10": reps["pixels16"]["knn@10"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--root", default="runs/arch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-queries", type=int, default=500)
    ap.add_argument("--limit-gallery", type=int, default=2000)
    ap.add_argument("--skip-training", action="store_true")
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    starts = {} if args.skip_training else train_both(root, args.minutes, args.seed)
    test_images = load_images([str(DATA / "imagenette-test-000000.tar")], 256)
    result = {"minutes": args.minutes, "seed": args.seed, "readout": READOUT,
              "validation": "queries imagenette-test-000001 (first "
                            f"{args.limit_queries}) vs train-000000..1 (first "
                            f"{args.limit_gallery}), σ 0.2, 1 draw", "runs": {}}
    for name in PRESETS:
        run = root / name
        snaps = sorted((run / "curve").glob("step-*.safetensors"),
                       key=lambda p: int(re.sub(r"\D", "", p.stem)))
        points = []
        final = ckpt.load(run / "model.safetensors").info
        sec_per_step = final["train_seconds"] / max(final["steps"], 1)
        for p in [s for s in snaps if int(re.sub(r"\D", "", s.stem)) >= 20] + \
                [run / "model.safetensors"]:
            row = score(p, test_images, args.limit_queries, args.limit_gallery)
            row["train_minutes"] = round(row["steps"] * sec_per_step / 60, 2)
            points.append(row)
            print(name, json.dumps(row), file=sys.stderr, flush=True)
        result["runs"][name] = {"params": sum(v.numel() for v in
                                              ckpt.load(run / "model.safetensors")
                                              .model.state_dict().values()),
                                "steps": final["steps"], "train_seconds": final["train_seconds"],
                                "img_per_s": round(final["images_seen"] /
                                                   max(final["train_seconds"], 1e-9), 2),
                                "points": points}
    out = REPO / "bench" / "results" / "arch_experiment.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, REPO / "docs" / "arch_experiment.png")
    print(json.dumps(result, indent=1))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for name, run in result["runs"].items():
        xs = [p["train_minutes"] for p in run["points"]]
        axes[0].plot(xs, [p["psnr_0_1"] for p in run["points"]], "o-", label=name)
        axes[1].plot(xs, [p["phi_mid_knn10"] for p in run["points"]], "o-", label=name)
        axes[2].plot(xs, [p["readout_knn10"] for p in run["points"]], "o-", label=name)
        axes[1].axhline(run["points"][-1]["untrained_mid_knn10"], ls=":", lw=1)
        axes[2].axhline(run["points"][-1]["untrained_readout_knn10"], ls=":", lw=1)
    for ax, t in zip(axes, ("PSNR at σ 0.1 (dB)", "paper's φ kNN@10 (val)",
                            f"{result['readout']} kNN@10 (val)")):
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("training CPU-minutes (1 thread)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
