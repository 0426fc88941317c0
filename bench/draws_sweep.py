"""σ and draws sweep (issue 9): how many noisy copies φ should average, and at which σ.

SPEC §2 averages the middle block over n noisy copies (the authors used n = 20); phisearch's
default is n = 4 at σ = 0.2, and each draw costs one encoder pass. This sweep embeds every image
once per σ with the largest number of draws, keeps the draws apart, and scores φ for every
d = 1, 2, 4, ... up to it from prefix means: draw j's noise does not depend on the number of
draws, so the mean of the first d draws *is* φ with d draws (tests/test_phi.py). Every
checkpoint given and the same network untrained (seed 0, as `idx eval`) are scored on the same
images with the same readouts; whitenings are fitted per setting on that setting's gallery
vectors (the train split), so σ = 0 is not judged with a whitening fitted at σ = 0.2. The choice
is made on validation queries (test-000001) and reported on test-000000.

    python bench/draws_sweep.py --checkpoint small64 --sigmas 0,0.2,0.3 --max-draws 16 \
        --cache runs/evalcache

Writes bench/results/draws_sweep.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
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
DECODER = ("D3.out", "D2.out", "D1.out")   # --decoder: needs the full forward (4-5x the cost)
# "blocks+z+l2": per-channel normalization (z-scores from the gallery, no rotation), then L2.
# "+white256^0.25": partial whitening, each principal axis scaled by λ^-0.25 instead of λ^-0.5.
READOUTS = ("mid", "blocks+z+l2", "blocks+white128+l2", "blocks+white192+l2",
            "blocks+white256+l2", "blocks+white256^0.25+l2")
DECODER_READOUTS = ("blocks+white256+l2", "dec+white128+l2", "all+white256+l2",
                    "all+white384+l2")


def per_draw_features(model: torch.nn.Module, sha: str, imgs: np.ndarray, sigma: float,
                      draws: int, cache: Path | None, taps: tuple[str, ...] = BLOCKS
                      ) -> tuple[dict[str, np.ndarray], float]:
    """{tap: (draws, N, C)} block means of every image and draw, and the seconds per image of
    one draw (from the run that computed them). Cached as `<idx eval name>_perdraw.npz`."""
    draws = 1 if sigma == 0 else draws
    digest = images_digest(imgs)

    def cached(d: int) -> Path | None:
        suffix = "_perdraw.npz" if taps == BLOCKS else "_perdraw_dec.npz"
        name = cache_name(sha, digest, sigma, d, 0, "cpu").replace(".npz", suffix)
        return cache / name if cache else None

    path = cached(draws)
    if cache is not None:   # a cached pass with at least as many draws holds these (prefixes)
        for d in range(draws, 257):
            p = cached(d)
            if p.is_file():
                with np.load(p) as z:
                    return {t: z[t][:draws] for t in taps}, float(z["__sec_per_pass__"])
    t0 = time.perf_counter()
    got = embed_images(model, imgs, sigma, draws, 0, taps, per_draw=True)
    sec = (time.perf_counter() - t0) / (len(imgs) * draws)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, __sec_per_pass__=np.float64(sec), **got)
        os.replace(tmp, path)
    return got, sec


def readout(f: dict[str, np.ndarray], d: int, label: str, n_query: int) -> np.ndarray:
    """One readout of φ with the first d draws; whitening fitted on the gallery rows."""
    if label == "mid":
        return f["M.out"][:d].mean(0)
    name = label.split("+")[0]
    taps = {"blocks": BLOCKS, "all": BLOCKS + DECODER, "dec": DECODER}[name]
    x = np.concatenate([f[t][:d].mean(0) for t in taps], 1)
    if label == "blocks+z+l2":
        g = x[n_query:]
        return l2_normalize((x - g.mean(0)) / (g.std(0) + 1e-6))
    k, _, power = label.split("+white")[1].split("+")[0].partition("^")
    w = Whitening.fit(x[n_query:], int(k))
    if power:   # column norms of proj are λ^-1/2 (unit principal axes): rescale to λ^-power
        norms = np.linalg.norm(w.proj, axis=0)
        w = Whitening(w.mean, w.proj * norms ** (2 * float(power) - 1))
    return l2_normalize(w.apply(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", action="append", default=None,
                    help="Repeatable; default: small64.")
    ap.add_argument("--queries", default=str(DATA / "imagenette-test-000000.tar"))
    ap.add_argument("--val-queries", default=str(DATA / "imagenette-test-000001.tar"))
    ap.add_argument("--gallery", default=str(DATA / "imagenette-train-{000000..000004}.tar"))
    ap.add_argument("--sigmas", default="0,0.2,0.3")
    ap.add_argument("--max-draws", type=int, default=16)
    ap.add_argument("--fit-extra", default=None,
                    help="More train shards whose vectors join the gallery's in fitting the "
                    "whitenings (not searched), e.g. imagenette-train-{000005..000009}.tar.")
    ap.add_argument("--flip", action="store_true",
                    help="Average each image's block means with its mirror image's (2x the "
                    "passes): a test-time augmentation.")
    ap.add_argument("--decoder", action="store_true",
                    help="Also the decoder blocks' means (full forward): readouts all = "
                    "encoder + middle + decoder, dec = decoder only.")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench/results/draws_sweep.json"))
    args = ap.parse_args()
    if args.flip and args.fit_extra:
        ap.error("--flip and --fit-extra are separate experiments; give one")
    sigmas = [float(s) for s in args.sigmas.split(",")]
    qi, ql, _ = load_split(args.queries)
    vi, vl, _ = load_split(args.val_queries)
    gi, gl, _ = load_split(args.gallery)
    nq, nv = len(qi), len(vi)
    imgs = np.concatenate([qi, vi, gi])
    nets: dict[str, ckpt.Checkpoint] = {}
    for name in args.checkpoint or ["small64"]:
        c = ckpt.load(name)
        nets[f"{c.name} ({c.sha256[:8]}, {c.info.get('steps')} steps)"] = c
    first = next(iter(nets.values()))
    nets["untrained"] = ckpt.untrained(first.model.cfg, seed=0)

    extra = load_split(args.fit_extra)[0] if args.fit_extra else imgs[:0]
    ng = len(gi)

    def metrics(x: np.ndarray) -> dict:
        g = x[nq + nv:nq + nv + ng]   # rows after the gallery only fit whitenings
        return {"test": retrieval_metrics(x[:nq], ql, g, gl),
                "val": retrieval_metrics(x[nq:nq + nv], vl, g, gl)}

    p16 = metrics(pixel_vectors(imgs, 16))   # (no extra rows: the metrics ignore them)
    rows: list[dict] = []

    def add(net: str, sigma: str | float, d: int, lab: str, x: np.ndarray, sec: float) -> None:
        m = metrics(x)
        rows.append({"net": net, "sigma": sigma, "draws": d, "readout": lab,
                     "img_per_s": 1.0 / sec, **m})
        print(f"{net} σ={sigma} d={d} {lab}: val {m['val']['knn@10']:.3f} "
              f"test {m['test']['knn@10']:.3f}", flush=True)

    taps, readouts = (BLOCKS + DECODER, DECODER_READOUTS) if args.decoder else (BLOCKS, READOUTS)
    for net, c in nets.items():
        per_sigma = {}
        for sigma in sigmas:
            f, sec = per_draw_features(c.model.eval(), c.sha256, imgs, sigma, args.max_draws,
                                       args.cache, taps)
            if len(extra):
                fx, _ = per_draw_features(c.model.eval(), c.sha256, extra, sigma,
                                          args.max_draws, args.cache, taps)
                f = {t: np.concatenate([f[t], fx[t]], axis=1) for t in f}
            if args.flip:   # (N, H, W, 3): W is axis 2
                ff, _ = per_draw_features(c.model.eval(), c.sha256,
                                          np.ascontiguousarray(imgs[:, :, ::-1]), sigma,
                                          args.max_draws, args.cache, taps)
                f, sec = {t: (f[t] + ff[t]) / 2 for t in f}, 2 * sec
            per_sigma[sigma] = (f, sec)
            n_draws = f["M.out"].shape[0]
            for d in sorted({d for d in (1, 2, 4, 8, 16, 32, 64) if d <= n_draws} | {n_draws}):
                for lab in readouts:
                    add(net, sigma, d, lab, readout(f, d, lab, nq + nv), sec * d)
        # Two noise levels side by side, whitened together: what the network sees of an image
        # at a low and a high σ (one readout, the cost of both passes).
        for i, a in enumerate(sigmas):
            for b in sigmas[i + 1:]:
                (fa, sa), (fb, sb) = per_sigma[a], per_sigma[b]
                da, db = min(fa["M.out"].shape[0], 4), min(fb["M.out"].shape[0], 4)
                x = np.concatenate([np.concatenate([f[t][:d].mean(0) for t in BLOCKS], 1)
                                    for f, d in ((fa, da), (fb, db))], 1)
                for k in (256, 384):
                    w = Whitening.fit(x[nq + nv:], k)
                    add(net, f"{a:g}+{b:g}", max(da, db), f"blocks@2σ+white{k}+l2",
                        l2_normalize(w.apply(x)), sa * da + sb * db)
    untrained = {(r["sigma"], r["draws"], r["readout"]): r for r in rows if r["net"] == "untrained"}
    trained = [r for r in rows if r["net"] != "untrained"]
    chosen = max(trained, key=lambda r: r["val"]["knn@10"])
    print(f"\n{nq} test and {nv} validation queries vs {len(gi)} gallery images; whitening fitted "
          f"per setting on the gallery; 16x16 pixels kNN@10 val {p16['val']['knn@10']:.3f}, "
          f"test {p16['test']['knn@10']:.3f}. Best on validation: {chosen['net']}, "
          f"σ={chosen['sigma']}, {chosen['draws']} draws, {chosen['readout']}\n")
    print("| network | σ | draws | readout | kNN@10 val | kNN@10 test | untrained test | "
          "trained / untrained (test) | / pixels16 (test) | img/s (1 core) |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for r in trained:
        u = untrained[(r["sigma"], r["draws"], r["readout"])]
        t, ut = r["test"]["knn@10"], u["test"]["knn@10"]
        mark = "**" if r is chosen else ""
        print(f"| {mark}{r['net']}{mark} | {r['sigma']} | {r['draws']} | {r['readout']} | "
              f"{r['val']['knn@10']:.3f} | {t:.3f} | {ut:.3f} | {t / ut:.2f} | "
              f"{t / p16['test']['knn@10']:.2f} | {r['img_per_s']:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "queries": args.queries, "val_queries": args.val_queries, "gallery": args.gallery,
        "whitening_fitted_on": "gallery" + (f" + {args.fit_extra}" if args.fit_extra else ""),
        "flip_averaged": args.flip,
        "pixels16": p16, "rows": rows,
        "chosen_on_val": {k: chosen[k] for k in ("net", "sigma", "draws", "readout")},
        "note": "φ with d draws = mean of the first d of max-draws per-draw passes (exact); "
                "whitening fitted per (network, σ, draws) on the gallery; img/s = one encoder "
                "pass per draw, measured while computing",
        "torch_threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
