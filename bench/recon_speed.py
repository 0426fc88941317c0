"""Speed vs fidelity of self-guided reconstruction (SPEC §4, search/reconstruct.py) on the CPU.

For 8 samples of one mini-shard image in σ-matched mode, each schedule row is run once and timed.
Fidelity is measured three ways, all with φ at the checkpoint's default settings (σ 0.2, 4 draws,
seed 0) on the uint8-rounded samples:
  rel       ||φ(x̂) − φ*|| / ||φ*||          (the CLI's phi_rel_error)
  centered  ||φ(x̂) − φ*|| / ||φ* − μ||      μ = mean φ of the mini shard; 1 ≈ no information
  top1      share of samples whose nearest mini-shard image by φ is the target itself
`rel` alone can mislead: φ has a large component common to all images, so an image unrelated
to the target may already score well below 0.15 (the `unguided` row shows how low).

Usage: .venv/bin/python bench/recon_speed.py --checkpoint /tmp/model.safetensors [--quick]
Prints a markdown table and writes bench/results/recon_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tarfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from phisearch.indexer.model import checkpoint as ckpt
from phisearch.indexer.model.config import PhiConfig
from phisearch.indexer.model.phi import as_uint8, phi
from phisearch.indexer.sources import images
from phisearch.search import reconstruct as R

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("PHISEARCH_DATA", REPO.parent / "shared" / "data"))
MINI = DATA / "imagenette-64" / "imagenette-mini-000000.tar"
GOAL_ERROR, GOAL_SECONDS = 0.15, 60.0

# Every row: this base with the row's overrides (fixed here, so a change to the presets does not
# change what the bench measures); (name, overrides, amp dtype). Each row is one full run.
BASE = {"lr": 0.03, "tol": 0.05, "spacing": "geometric", "draws": 4, "sigma_max": 1.0,
        "sigma_min": 0.03, "algorithm": "A"}
ROWS: list[tuple[str, dict, str]] = [
    ("unguided", {"levels": 20, "inner_steps": 0}, "fp32"),
    ("L5 S5", {"levels": 5, "inner_steps": 5}, "fp32"),
    ("L5 S10", {"levels": 5, "inner_steps": 10}, "fp32"),
    ("L10 S3", {"levels": 10, "inner_steps": 3}, "fp32"),
    ("L10 S5", {"levels": 10, "inner_steps": 5}, "fp32"),
    ("L10 S5 bf16", {"levels": 10, "inner_steps": 5}, "bf16"),
    ("L10 S10", {"levels": 10, "inner_steps": 10}, "fp32"),
    ("L20 S5", {"levels": 20, "inner_steps": 5}, "fp32"),
    ("L10 S20", {"levels": 10, "inner_steps": 20}, "fp32"),
    ("L20 S10", {"levels": 20, "inner_steps": 10}, "fp32"),
    ("L20 S10 linear", {"levels": 20, "inner_steps": 10, "spacing": "linear"}, "fp32"),
    ("L20 S10 lr.01 tol.01", {"levels": 20, "inner_steps": 10, "lr": 0.01, "tol": 0.01}, "fp32"),
    ("L10 S10 lr.1", {"levels": 10, "inner_steps": 10, "lr": 0.1}, "fp32"),
    ("L10 S10 bf16", {"levels": 10, "inner_steps": 10}, "bf16"),
]
QUICK = ("unguided", "L10 S5", "L10 S10")


def mini_images() -> tuple[list[str], np.ndarray]:
    keys, imgs = [], []
    with tarfile.open(MINI) as tf:
        for m in tf:
            if m.name.endswith(".jpg"):
                keys.append(m.name.removesuffix(".jpg"))
                imgs.append(images.decode(tf.extractfile(m).read()))
    return keys, np.stack(imgs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(REPO / "runs" / "small64" / "model.safetensors"))
    ap.add_argument("--target", type=int, default=0, help="index of the mini-shard image")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is fastest while another job holds the other core)")
    ap.add_argument("--quick", action="store_true", help="only the first rows")
    ap.add_argument("--only", default="", help="comma-separated row names to run")
    ap.add_argument("--append", action="store_true",
                    help="merge the rows into the existing --out file (same checkpoint only)")
    ap.add_argument("--note", default="2-core CPU shared with a running `idx train` job "
                    "(small64, batch 32) and other colleagues' tests: timings are pessimistic")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "recon_speed.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    c = ckpt.load(args.checkpoint)
    model, pc = c.model, PhiConfig()
    keys, imgs = mini_images()
    ref = phi(model, imgs, pc.sigma, pc.draws, pc.seed)                   # (100, C)
    mu = ref.mean(0)
    target = imgs[args.target: args.target + 1]
    phi_t = ref[args.target]
    others = torch.cat([ref[: args.target], ref[args.target + 1:]])
    # How far other images are from the target: what "no information" scores.
    rel_others = float(((others - phi_t).norm(dim=1) / phi_t.norm()).median())
    print(f"checkpoint {c.path} ({c.sha256[:12]}), target {keys[args.target]}; median rel φ "
          f"distance of the other mini images to it: {rel_others:.4f}", file=sys.stderr)

    only = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = only - {name for name, _, _ in ROWS}
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}")
    out = Path(args.out)
    rows = []
    if args.append and out.exists():
        old = json.loads(out.read_text())
        if old["model_sha256"] != c.sha256:
            ap.error(f"{out} was measured with another checkpoint")
        rows = [r for r in old["rows"] if r["name"] not in only]
    load_before = os.getloadavg()
    order = {name: i for i, (name, _, _) in enumerate(ROWS)}

    def pick(key: str) -> str | None:
        ok = [r for r in rows if r["inner_steps"] > 0 and r[key] <= GOAL_ERROR
              and r["seconds"] <= GOAL_SECONDS]
        return min(ok, key=lambda r: r["seconds"])["name"] if ok else None

    def save(rows: list[dict]) -> dict:
        rows.sort(key=lambda r: order.get(r["name"], len(order)))
        result = {
            "checkpoint": str(c.path), "model_sha256": c.sha256,
            "training_steps": c.info.get("steps"), "target_key": keys[args.target],
            "n_samples": args.n, "phi": {"sigma": pc.sigma, "draws": pc.draws, "seed": pc.seed},
            "median_rel_distance_other_images": rel_others,
            "goal": {"median_error": GOAL_ERROR, "seconds": GOAL_SECONDS},
            "fastest_meeting_goal": {"rel": pick("median_rel_error"),
                                     "centered": pick("median_centered_error")},
            "rows": rows,
            "host": {"cpus": os.cpu_count(), "threads": args.threads,
                     "machine": platform.machine(), "torch": torch.__version__,
                     "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                     "note": args.note},
            "date": time.strftime("%Y-%m-%d %H:%M"),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        return result

    for name, over, amp in ROWS:
        if (args.quick and name not in QUICK) or (only and name not in only):
            continue
        sch = R.Schedule(**{**BASE, **over})
        rec = R.reconstruct(model, images=target, n=args.n, sch=sch, seed=0, phi_config=pc,
                            amp_dtype=torch.bfloat16 if amp == "bf16" else None)
        got = phi(model, as_uint8(rec.samples), pc.sigma, pc.draws, pc.seed)   # (n, C)
        err = (got - phi_t).norm(dim=1)
        centered = err / (phi_t - mu).norm()
        top1 = float((torch.cdist(got, ref).argmin(dim=1) == args.target).float().mean())
        row = {"name": name, "levels": sch.levels, "inner_steps": sch.inner_steps, "lr": sch.lr,
               "tol": sch.tol, "spacing": sch.spacing, "draws": sch.draws, "dtype": amp,
               "seconds": round(rec.seconds, 2), "batch_steps": rec.batch_steps,
               "steps": rec.steps,
               "median_rel_error": float(np.median(rec.phi_rel_error)),
               "median_centered_error": float(centered.median()),
               "top1": top1, "schedule": asdict(sch)}
        rows.append(row)
        save(rows)   # after every row: a run stopped early keeps what it measured
        print(f"{name:22s} {row['seconds']:7.1f}s rel {row['median_rel_error']:.4f} "
              f"centered {row['median_centered_error']:.3f} top1 {top1:.2f}", file=sys.stderr)

    print("\n| schedule | levels | inner steps | lr | tol | dtype | seconds | batch steps | "
          "median rel φ error | median centered error | top-1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['levels']} | {r['inner_steps']} | {r['lr']} | {r['tol']} | "
              f"{r['dtype']} | {r['seconds']:.1f} | {r['batch_steps']} | "
              f"{r['median_rel_error']:.4f} | {r['median_centered_error']:.3f} | "
              f"{r['top1']:.2f} |")
    print(f"\nfastest meeting the goal: {save(rows)['fastest_meeting_goal']}; wrote {out}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
