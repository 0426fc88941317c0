"""Why unguided samples from σ 1 are grey (docs/reconstruction.md, "the first level"): the
photos' coarse-scale spread beside the unguided samples' contrast from several first levels.

Photos (the Imagenette mini shard, 100 images): the spread across images of the mean colour and
of 8x8 block means (per pixel; times 64 and 8 it is the spread of that coefficient in an
orthonormal basis, to compare with the noise σ), and `search.recon_report.image_stats`. Samples:
the shipped model, no guidance, seed 0, `image_stats` for each schedule row.

    OMP_NUM_THREADS=1 .venv/bin/python bench/recon_contrast.py --out bench/results/recon_contrast.json
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from phisearch.indexer.model import checkpoint as ckpt
from phisearch.indexer.sources import images
from phisearch.indexer.sources.shards import read_shard
from phisearch.search import recon_report as rr
from phisearch.search import reconstruct as rc

MINI = Path(os.environ.get("PHISEARCH_DATA", Path(__file__).resolve().parents[2] / "shared" /
                           "data")) / "imagenette-64" / "imagenette-mini-000000.tar"


def photo_stats(shard: Path) -> dict:
    x = np.stack([images.decode(r["jpg"]) for r in read_shard(str(shard)) if isinstance(r, dict)])
    f = x.astype(np.float32) / 255
    blocks = f.reshape(len(f), 8, 8, 8, 8, 3).mean((2, 4))
    return {"images": len(x), "mean_colour_std": [round(float(v), 3) for v in f.mean((1, 2)).std(0)],
            "block8_mean_std": round(float(blocks.std(0).mean()), 3), **rr.image_stats(x)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=4, help="unguided samples per row")
    ap.add_argument("--out", type=Path, default=Path("bench/results/recon_contrast.json"))
    a = ap.parse_args()
    model = ckpt.load().model
    base = replace(rc.SCHEDULES["fast"], inner_steps=0)
    rows = {"fast, from σ 1": replace(base, sigma_max=1.0),
            "fast (from σ 5)": base,
            "fast from σ 5, fresh noise": replace(base, renoise="fresh"),
            "100 linear levels from σ 1": replace(base, sigma_max=1.0, levels=100,
                                                  spacing="linear")}
    out = {"bench": "recon_contrast", "model_sha256": ckpt.load().sha256[:12], "seed": 0,
           "samples": a.n, "photos": photo_stats(MINI), "rows": []}
    print("photos", out["photos"])
    for name, sch in rows.items():
        st = rr.image_stats(rc.reconstruct(model, n=a.n, sch=sch, seed=0).images())
        out["rows"].append({"schedule": name, "settings": asdict(sch), **st})
        print(name, st, flush=True)
    a.out.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
