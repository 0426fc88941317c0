"""Whitening size K of the default readout (`blocks+whiteK+l2`), chosen on validation.

The shipped small64's default is K = 128, chosen on Imagenette validation when the model had only
seen Imagenette; since the Tiny ImageNet models, K = 256 has been ahead on both *test* sets, which
must not decide it. This fits every K from one pass, as the ship does (`idx fit-readout` on the
first 10,050 Tiny ImageNet training images in shard order, σ 0.2, 4 draws, into a copy of the
checkpoint: the weights and so the eval cache keys are the same), then scores each readout with
kNN@10 on the four protocols of bench/protocols.py (the φ passes are `idx eval --cache`'s files,
so a protocol `idx eval` or the ship has seen costs no pass; no clustering metrics, which are
most of `idx eval`'s time). Validation decides; test is reported.

    OMP_NUM_THREADS=1 python bench/k_sweep.py --checkpoint small64 --cache runs/evalcache

Writes bench/results/k_sweep_<steps>.json and prints a markdown table (kNN@10, validation first).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from protocols import PROTOCOLS, TINY_TRAIN

IDX = str(Path(sys.executable).parent / "idx")


def passes(model, sha: str, images: np.ndarray, cache: Path) -> dict[str, np.ndarray]:
    """Tap means of `images` at σ 0.2, 4 draws, seed 0: idx eval's cache file, else a pass."""
    from phisearch.indexer.model.readout import READOUT_TAPS
    from phisearch.search.evaluate import (
        cache_name,
        embed_images,
        images_digest,
        read_cache,
        write_cache,
    )
    taps = READOUT_TAPS["blocks"]
    path = cache / cache_name(sha, images_digest(images), 0.2, 4, 0, "cpu")
    got, _, found = read_cache(path, taps)
    if found:
        return got
    t0 = time.perf_counter()
    got = embed_images(model, images, 0.2, 4, 0, taps)
    write_cache(path, got, time.perf_counter() - t0)
    return got


def score(fitted: Path, proto: str, dims: list[int], cache: Path) -> dict[str, float]:
    """kNN@10 of the paper's φ and of blocks+whiteK+l2 for every K stored in `fitted`."""
    import torch
    from phisearch.indexer.model import checkpoint as ckpt
    from phisearch.indexer.model.readout import Readout
    from phisearch.search.evaluate import load_split
    from phisearch.search.metrics import retrieval_metrics
    c = ckpt.load(fitted)
    queries, gallery, sel = PROTOCOLS[proto]
    qi, ql, _ = load_split(queries, None, sel.get("queries_per_class"),
                           sel.get("queries_skip_per_class", 0))
    gi, gl, _ = load_split(gallery, None, sel.get("gallery_per_class"))
    sha = c.info["weights_sha256"]
    fq, fg = (passes(c.model, sha, x, cache) for x in (qi, gi))
    out = {}
    for label in ["mid"] + [f"blocks+white{d}+l2" for d in dims]:
        r = Readout.from_checkpoint(label, c.extras)
        vq, vg = (r.vectors({t: torch.from_numpy(f[t]) for t in r.taps}) for f in (fq, fg))
        out[label] = round(retrieval_metrics(vq, ql, vg, gl)["knn@10"], 4)
    return out


PROTOS = ("tiny-val", "imagenette-val", "tiny-test", "imagenette-test")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="small64")
    p.add_argument("--dims", default="64,96,128,192,256,384")
    p.add_argument("--fit-images", type=int, default=10050)
    p.add_argument("--cache", default="runs/evalcache")
    p.add_argument("--work", default="runs/ksweep", help="where the checkpoint copy goes")
    a = p.parse_args()

    from phisearch.indexer.model import checkpoint as ckpt
    src = ckpt.resolve(a.checkpoint)
    steps = json.loads(src.with_suffix(".json").read_text()).get("steps", 0)
    dims = [int(d) for d in a.dims.split(",")]
    work = REPO / a.work
    work.mkdir(parents=True, exist_ok=True)
    fitted = work / f"{src.stem}-{steps}-k{'_'.join(map(str, dims))}.safetensors"
    if not fitted.exists():
        cmd = [IDX, "fit-readout", "--checkpoint", str(src), "--data", TINY_TRAIN,
               "--limit", str(a.fit_images), "--l2", "--no-default", "--out", str(fitted)]
        for d in dims:
            cmd += ["--dims", str(d)]
        subprocess.run(cmd, check=True, cwd=REPO)
    table = {proto: score(fitted, proto, dims, Path(a.cache)) for proto in PROTOS}
    result = {"checkpoint": str(src.relative_to(REPO)) if src.is_relative_to(REPO) else str(src),
              "steps": steps, "fitted_on": f"{TINY_TRAIN} (first {a.fit_images} in shard order)",
              "sigma": 0.2, "draws": 4, "dims": dims, "knn@10": table,
              "choice_by": "mean of tiny-val and imagenette-val kNN@10 of blocks+whiteK+l2"}
    trained = [f"blocks+white{d}+l2" for d in dims]
    val = {r: (table["tiny-val"][r] + table["imagenette-val"][r]) / 2 for r in trained}
    result["best_on_validation"] = max(val, key=val.get)
    dst = REPO / "bench" / "results" / f"k_sweep_{steps}.json"
    dst.write_text(json.dumps(result, indent=1))
    print("| readout | " + " | ".join(PROTOS) + " |\n|---|" + "---|" * len(PROTOS))
    for name in table["tiny-val"]:
        print(f"| {name} | " + " | ".join(f"{table[p].get(name, float('nan')):.3f}"
                                          for p in PROTOS) + " |")
    print(f"best on validation: {result['best_on_validation']} -> {dst.relative_to(REPO)}")


if __name__ == "__main__":
    main()
