"""End-to-end `idx build` throughput on CPU (or CUDA) with its stage breakdown, and the ratio to
φ alone on preloaded images (same checkpoint, same φ settings, same batch size).

    python bench/build_throughput.py --data '<imagenette>/imagenette-train-{000000..000009}.tar'
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from phisearch.indexer.ingest.pipeline import BuildConfig, build
from phisearch.indexer.model.config import PhiConfig
from phisearch.indexer.model.embedder import Embedder
from phisearch.indexer.sources.shards import expand
from phisearch.indexer.store import StoreConfig
from phisearch.indexer.train.loop import load_images

DATA = os.environ.get("PHISEARCH_DATA", "../shared/data")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", nargs="+",
                    default=[f"{DATA}/imagenette-64/imagenette-train-{{000000..000009}}.tar"])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--sigma", type=float, default=0.2)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--phi-images", type=int, default=1024, help="images for the φ-alone rate")
    ap.add_argument("--out", default="bench/results/build_throughput.json")
    args = ap.parse_args()

    phi_cfg = PhiConfig(sigma=args.sigma, draws=args.draws, seed=0)
    emb = Embedder.create(args.checkpoint, phi_cfg, args.device)
    urls = expand(args.data)
    imgs = load_images(urls[:2], args.phi_images)
    emb(imgs[: args.batch_size])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(imgs), args.batch_size):
        emb(imgs[i:i + args.batch_size])
    phi_alone = len(imgs) / (time.perf_counter() - t0)

    tmp = tempfile.mkdtemp(prefix="phisearch-build-bench-")
    try:
        summary = build(BuildConfig(data=tuple(urls), store=StoreConfig(path=tmp),
                                    checkpoint=args.checkpoint, phi=phi_cfg,
                                    batch_size=args.batch_size, workers=args.workers,
                                    device=args.device))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {
        "benchmark": "build_throughput", "checkpoint": emb.meta()["checkpoint"],
        "model_sha256": emb.checkpoint.sha256, "device": str(emb.device),
        "threads": torch.get_num_threads(), "host": platform.node(),
        "sigma": args.sigma, "draws": args.draws, "batch_size": args.batch_size,
        "workers": args.workers, "shards": len(urls),
        "indexed": summary["indexed"], "skipped": summary["skipped"],
        "seconds": summary["seconds"], "build_img_per_s": summary["img_per_s"],
        "stages": summary["stages"], "phi_alone_img_per_s": round(phi_alone, 2),
        "build_over_phi_alone": round(summary["img_per_s"] / phi_alone, 3),
    }
    st = out["stages"]
    print(f"build: {out['indexed']} images in {out['seconds']:.1f} s = "
          f"{out['build_img_per_s']:.1f} img/s ({out['checkpoint']}, σ={args.sigma}, "
          f"draws={args.draws}, {out['device']})")
    print(f"stages: decode wait {st['decode_wait_s']} s, φ {st['phi_s']} s "
          f"({st['phi_img_per_s']} img/s), upsert {st['upsert_s']} s "
          f"({st['upsert_points_per_s']} points/s, background thread)")
    print(f"φ alone on preloaded images: {out['phi_alone_img_per_s']} img/s; "
          f"build / φ alone = {out['build_over_phi_alone']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
