"""Learning curve: does φ become semantic as the denoiser trains, and when does it overtake the
baselines? Runs `idx eval`'s code (search/evaluate.py) on every log-spaced snapshot that
`idx train` keeps in RUN/curve/ (plus RUN/model.safetensors), with the same queries and gallery
for all, and records kNN@1, kNN@10 and NMI of every readout beside raw pixels, 16x16 pixels and
the untrained network (the same readouts). Whitened readouts are fitted on the gallery vectors
of each snapshot (the snapshots carry no stored whitening), so every step is treated alike.

    python bench/learning_curve.py --run runs/small64 \
        --queries $D/imagenette-test-000000.tar --gallery "$D/imagenette-train-{000000..000004}.tar" \
        --limit-queries 300 --limit-gallery 1500

Writes bench/results/learning_curve.json and docs/learning_curve.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import torch
from phisearch.indexer.model import checkpoint as ckpt
from phisearch.search.evaluate import EvalSettings, evaluate

READOUTS = ("mid", "blocks", "mid+white64", "blocks+white64")
METRICS = ("knn@1", "knn@10", "nmi")


def snapshots(run: Path) -> list[Path]:
    """RUN/curve/step-*.safetensors in step order, then RUN/model.safetensors (the latest)."""
    steps = sorted((run / "curve").glob("step-*.safetensors"),
                   key=lambda p: int(re.sub(r"\D", "", p.stem)))
    final = run / "model.safetensors"
    return steps + ([final] if final.is_file() else [])


def series(result: dict) -> dict[str, dict[str, float]]:
    """The representations a curve plots, named by what they are."""
    reps = result["representations"]
    out = {}
    for lab in READOUTS:
        trained = "phi_mid_raw" if lab == "mid" else f"phi_{lab}"
        untrained = "random_init_mid_raw" if lab == "mid" else f"random_init_{lab}"
        out[f"trained {lab}"] = reps[trained]
        out[f"untrained {lab}"] = reps[untrained]
    out["pixels"] = reps["pixels"]
    out["pixels16"] = reps["pixels16"]
    return {name: {m: round(v[m], 4) for m in METRICS} for name, v in out.items()}


def overtakes(points: list[dict], a: str, b: str, metric: str = "knn@10") -> int | None:
    """The first step from which `a` stays above `b` (None if it never does)."""
    first = None
    for p in points:
        if p["series"][a][metric] > p["series"][b][metric]:
            first = p["steps"] if first is None else first
        else:
            first = None
    return first


def plot(points: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [max(p["steps"], 0.5) for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric in zip(axes, ("knn@10", "nmi")):
        for lab, color in zip(READOUTS, ("C0", "C1", "C2", "C3")):
            ax.plot(steps, [p["series"][f"trained {lab}"][metric] for p in points], "-o",
                    color=color, ms=3, label=f"trained, {lab}")
            ax.plot(steps, [p["series"][f"untrained {lab}"][metric] for p in points], ":",
                    color=color, alpha=0.7, label=f"untrained, {lab}")
        for rep, style in (("pixels16", "k--"), ("pixels", "k-.")):
            ax.plot(steps, [p["series"][rep][metric] for p in points], style, lw=1, label=rep)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("training step (batch 32; step 0 plotted at 0.5)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="A training run folder (curve/ + model.safetensors).")
    ap.add_argument("--checkpoints", nargs="*", default=[], help="Checkpoints instead of --run.")
    ap.add_argument("--queries", required=True)
    ap.add_argument("--gallery", required=True, nargs="+")
    ap.add_argument("--limit-queries", type=int, default=300)
    ap.add_argument("--limit-gallery", type=int, default=1500)
    ap.add_argument("--sigma", type=float, default=0.2)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--cache-dir", default=None, help="Reuse vectors of unchanged networks.")
    ap.add_argument("--out", type=Path, default=Path("bench/results/learning_curve.json"))
    ap.add_argument("--png", type=Path, default=Path("docs/learning_curve.png"))
    args = ap.parse_args()
    paths = [Path(p) for p in args.checkpoints] or snapshots(args.run)
    if not paths:
        raise SystemExit("no checkpoints: give --run with a curve/ folder or --checkpoints")
    settings = EvalSettings(sigma=args.sigma, draws=args.draws, extra=(), readouts=READOUTS,
                            limit_queries=args.limit_queries, limit_gallery=args.limit_gallery,
                            cache_dir=args.cache_dir)
    points = []
    for path in paths:
        c = ckpt.load(str(path))
        steps = int(c.info.get("steps", 0))
        t0 = time.perf_counter()
        res = evaluate(c, args.queries, args.gallery, "blocks+white64", settings)
        points.append({"checkpoint": str(path), "steps": steps,
                       "images_seen": c.info.get("images_seen"), "model_sha256": c.sha256,
                       "series": series(res), "seconds": round(time.perf_counter() - t0, 1)})
        s = points[-1]["series"]
        print(f"step {steps:>6}: kNN@10 mid {s['trained mid']['knn@10']:.3f} "
              f"(untrained {s['untrained mid']['knn@10']:.3f}), blocks+white64 "
              f"{s['trained blocks+white64']['knn@10']:.3f} (untrained "
              f"{s['untrained blocks+white64']['knn@10']:.3f}), pixels16 "
              f"{s['pixels16']['knn@10']:.3f}  [{points[-1]['seconds']} s]", flush=True)
    points.sort(key=lambda p: p["steps"])
    summary = {
        f"{lab}: trained overtakes untrained at step": overtakes(
            points, f"trained {lab}", f"untrained {lab}") for lab in READOUTS}
    summary.update({f"{lab}: trained overtakes pixels16 at step": overtakes(
        points, f"trained {lab}", "pixels16") for lab in READOUTS})
    result = {
        "points": points, "overtakes_knn@10": summary,
        "settings": {"queries": args.queries, "gallery": args.gallery,
                     "limit_queries": args.limit_queries, "limit_gallery": args.limit_gallery,
                     "sigma": args.sigma, "draws": args.draws, "readouts": READOUTS,
                     "whitening": "fitted on each snapshot's gallery vectors"},
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for k, v in summary.items():
        print(f"{k}: {v}")
    if args.png:
        plot(points, args.png, f"imagenette: {args.limit_queries} test queries vs "
             f"{args.limit_gallery} train gallery, σ={args.sigma:g}, {args.draws} draws")
        print(f"wrote {args.out} and {args.png}")


if __name__ == "__main__":
    main()
