"""Readout sweep (issue 9): what to do with the network's block means before Euclidean search.

For the trained checkpoint and the same network untrained (same seed as `idx eval`), on the same
queries (test) and gallery (train): whitening size K, L2 normalization after whitening, a square
root before whitening (power normalization of the non-negative means), per-block scaling to equal
variance, which blocks, and pooling of the middle block (mean, mean+max, 2x2 quadrant means). Every variant costs the same φ pass (encoder + middle block, σ 0.2,
4 draws; its img/s is in `idx eval`'s output); the post-processing is negligible. Whitenings are
fitted on the gallery vectors (the training split), as `idx fit-readout` does.

    python bench/readout_sweep.py --checkpoint small64 --cache runs/evalcache

Reuses `idx eval --cache` vectors when they exist (same file names). Writes
bench/results/readout_sweep.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from phisearch.indexer.model import checkpoint as ckpt
from phisearch.indexer.model.readout import Whitening, l2_normalize
from phisearch.search.evaluate import (
    cache_name,
    embed_images,
    images_digest,
    load_split,
    pixel_vectors,
)
from phisearch.search.metrics import retrieval_metrics

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("PHISEARCH_DATA", REPO.parent / "shared" / "data")) / "imagenette-64"
BLOCKS = ("E1.out", "E2.out", "E3.out", "M.out")
# Other poolings of the middle block's map, computed here (bench only, not in the φ path).
MID_MAX = "M.out:max"    # spatial max of the middle block's channels
MID_2X2 = "M.out:2x2"    # means over the 2x2 quadrants (4 C values, quadrant-major per channel)
POOLINGS = {MID_MAX: lambda m: m.amax(dim=(-2, -1)),
            MID_2X2: lambda m: torch.nn.functional.adaptive_avg_pool2d(m, 2).flatten(1)}
POOLED = tuple(POOLINGS)


def _cached(path: Path | None, taps: tuple[str, ...], compute: Callable[[], dict]) -> dict:
    if path is not None and path.is_file():
        with np.load(path) as z:
            if all(t.replace(":", "_") in z.files for t in taps):
                return {t: z[t.replace(":", "_")] for t in taps}
    t0 = time.perf_counter()
    got = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path.with_suffix(".tmp.npz"), __seconds__=np.float64(time.perf_counter() - t0),
                 **{t.replace(":", "_"): v for t, v in got.items()})
        os.replace(path.with_suffix(".tmp.npz"), path)
    return got


def features(model, sha: str, imgs: np.ndarray, sigma: float, draws: int, seed: int,
             cache: Path | None) -> dict[str, np.ndarray]:
    """Block means of every image (cached under idx eval's file name for the same pass) and the
    middle block's other poolings (a second cache file)."""
    stem = cache_name(sha, images_digest(imgs), sigma, draws, seed, "cpu").removesuffix(".npz")
    got = _cached(cache / f"{stem}.npz" if cache else None, BLOCKS,
                  lambda: embed_images(model, imgs, sigma, draws, seed, BLOCKS))
    got.update(_cached(cache / f"{stem}_pool.npz" if cache else None, POOLED,
                       lambda: embed_images(model, imgs, sigma, draws, seed, (), poolings=POOLINGS)))
    return got


def variants(f: dict[str, np.ndarray], nq: int) -> dict[str, Callable[[], np.ndarray]]:
    """Named readouts of one network's block means: name -> vectors (queries then gallery)."""
    blocks = np.concatenate([f[t] for t in BLOCKS], 1)

    def white(x: np.ndarray, k: int, l2: bool = False) -> np.ndarray:
        y = Whitening.fit(x[nq:], k).apply(x)
        return l2_normalize(y) if l2 else y

    def per_block(x_of: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        parts = [x_of(f[t]) for t in BLOCKS]
        return np.concatenate([p / np.sqrt(p[nq:].var(0).sum() + 1e-12) for p in parts], 1)

    sq = lambda x: np.sqrt(np.clip(x, 0, None))
    out: dict[str, Callable[[], np.ndarray]] = {
        "mid raw (the paper's φ)": lambda: f["M.out"],
        "mid +white64": lambda: white(f["M.out"], 64),
        "mid +white64 +l2": lambda: white(f["M.out"], 64, True),
        "blocks raw": lambda: blocks,
        "blocks +l2 (no whitening)": lambda: l2_normalize(blocks),
        "blocks per-block-scaled +white64 +l2": lambda: white(per_block(lambda a: a), 64, True),
        "mid mean+max +white64 +l2": lambda: white(np.concatenate([f["M.out"], f[MID_MAX]], 1),
                                                   64, True),
        "mid 2x2-pooled +white64 +l2": lambda: white(f[MID_2X2], 64, True),
        "blocks + mid max +white64 +l2": lambda: white(np.concatenate([blocks, f[MID_MAX]], 1),
                                                       64, True),
        "encoder blocks only +white64 +l2": lambda: white(
            np.concatenate([f[t] for t in BLOCKS[:3]], 1), 64, True),
    }
    for k in (32, 48, 64, 128, 192, 256):
        out[f"blocks +white{k}"] = lambda k=k: white(blocks, k)
        out[f"blocks +white{k} +l2"] = lambda k=k: white(blocks, k, True)
    for k in (32, 48, 64, 128):
        out[f"blocks +sqrt +white{k} +l2"] = lambda k=k: white(sq(blocks), k, True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="small64")
    ap.add_argument("--queries", default=str(DATA / "imagenette-test-000000.tar"))
    ap.add_argument("--val-queries", default=str(DATA / "imagenette-test-000001.tar"),
                    help="Queries the readout is chosen on (reported: --queries).")
    ap.add_argument("--gallery", default=str(DATA / "imagenette-train-{000000..000004}.tar"))
    ap.add_argument("--sigma", type=float, default=0.2)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench/results/readout_sweep.json"))
    args = ap.parse_args()
    qi, ql, _ = load_split(args.queries)
    vi, vl, _ = load_split(args.val_queries)
    gi, gl, _ = load_split(args.gallery)
    nq, nv = len(qi), len(vi)
    c = ckpt.load(args.checkpoint)
    u = ckpt.untrained(c.model.cfg, seed=0)

    def metrics(x: np.ndarray) -> dict:
        """x rows: test queries, validation queries, gallery."""
        g = x[nq + nv:]
        return {"test": retrieval_metrics(x[:nq], ql, g, gl),
                "val": retrieval_metrics(x[nq:nq + nv], vl, g, gl)}

    rows: dict[str, dict] = {}
    pix = pixel_vectors(np.concatenate([qi, vi, gi]), 16)
    rows["pixels16"] = {"baseline": metrics(pix)}
    rows["pixels16 +white64 +l2"] = {"baseline": metrics(
        l2_normalize(Whitening.fit(pix[nq + nv:], 64).apply(pix)))}
    nets = {"trained": (c.model, c.sha256), "untrained": (u.model, u.sha256)}
    feats = {}
    for name, (m, sha) in nets.items():   # test+gallery as idx eval caches it, then validation
        tg = features(m.eval(), sha, np.concatenate([qi, gi]), args.sigma, args.draws, 0,
                      args.cache)
        val = features(m.eval(), sha, vi, args.sigma, args.draws, 0, args.cache)
        feats[name] = {t: np.concatenate([tg[t][:nq], val[t], tg[t][nq:]]) for t in tg}
    for name in variants(feats["trained"], nq + nv):
        rows[name] = {net: metrics(variants(f, nq + nv)[name]()) for net, f in feats.items()}
    p16 = rows["pixels16"]["baseline"]["test"]["knn@10"]
    chosen = max((n for n in rows if "trained" in rows[n]),
                 key=lambda n: rows[n]["trained"]["val"]["knn@10"])
    print(f"checkpoint {c.name} ({c.sha256[:12]}, {c.info.get('steps')} steps); {nq} test "
          f"queries, {nv} validation queries vs {len(gi)} gallery; σ {args.sigma:g}, "
          f"{args.draws} draws; chosen on validation kNN@10: {chosen}\n")
    print("| readout | kNN@10 val | kNN@10 test | untrained test | trained / untrained | "
          "trained / pixels16 | kNN@1 test | mAP test |\n|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        if "baseline" in r:
            b, v = r["baseline"]["test"], r["baseline"]["val"]
            print(f"| {name} | {v['knn@10']:.3f} | {b['knn@10']:.3f} | – | – | "
                  f"{b['knn@10'] / p16:.2f} | {b['knn@1']:.3f} | {b['map']:.3f} |")
            continue
        t, un, v = r["trained"]["test"], r["untrained"]["test"], r["trained"]["val"]
        mark = "**" if name == chosen else ""
        print(f"| {mark}{name}{mark} | {v['knn@10']:.3f} | {t['knn@10']:.3f} | {un['knn@10']:.3f} "
              f"| {t['knn@10'] / un['knn@10']:.2f} | {t['knn@10'] / p16:.2f} | {t['knn@1']:.3f} "
              f"| {t['map']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "checkpoint": c.name, "model_sha256": c.sha256, "steps": c.info.get("steps"),
        "queries": args.queries, "val_queries": args.val_queries, "chosen_on_val": chosen,
        "gallery": args.gallery, "sigma": args.sigma,
        "draws": args.draws, "rows": rows,
        "note": "every row costs the same φ pass; whitening fitted on the gallery (train split)",
        "torch_threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
