"""Do reconstructions carry the target's meaning? (issue 5, SPEC §4)

For T labelled test images (balanced over classes), draw N guided samples each (σ-matched mode,
the `fast` schedule, the collection's checkpoint), embed every sample with the collection's own
readout and φ settings, and search the index: a sample "keeps the class" when the majority label
of its top-10 is the target's label. The target's own point is left out of the hits. Beside it,
the same for N unguided samples per target (the plain sampler, same levels, no guidance) — what
chance looks like for images of this sampler — and the target image's own top-10 majority (the
ceiling: retrieval from the real image).

    python bench/recon_fidelity.py --queries $D/imagenette-test-000000.tar --targets 50 -n 4

Writes bench/results/recon_fidelity.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from phisearch.indexer.cli.common import default_store
from phisearch.search.query import embedder_for
from phisearch.indexer.model.phi import as_uint8
from phisearch.indexer.store import StoreConfig, open_store, point_id
from phisearch.search import recon_report
from phisearch.search import reconstruct as R
from phisearch.search.evaluate import load_split


def balanced(labels: np.ndarray, total: int) -> np.ndarray:
    """Indices of the first total // classes images of every class, in class order."""
    classes = np.unique(labels)
    per = max(1, total // len(classes))
    return np.concatenate([np.flatnonzero(labels == c)[:per] for c in classes])[:total]


def majority(labels: list) -> object:
    """The most common label; ties go to the label met first (nearest)."""
    return recon_report.majority(labels)[0]


def top10_majority(store, vectors: np.ndarray, exclude: list[str]) -> list[object]:
    out = []
    for vec, skip in zip(vectors, exclude):
        hits = [h for h in store.search(vec, limit=11) if h.id != skip][:10]
        out.append(majority([h.payload.get("label") for h in hits]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", required=True, help="Labelled test shard(s).")
    ap.add_argument("--targets", type=int, default=50)
    ap.add_argument("-n", type=int, default=4, help="Samples per target.")
    ap.add_argument("--schedule", default="fast")
    ap.add_argument("--levels", type=int, default=None, help="Override the schedule's levels.")
    ap.add_argument("--inner-steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--tol", type=float, default=None)
    ap.add_argument("--batch-targets", type=int, default=10, help="Targets per sampler batch.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store", default=default_store())
    ap.add_argument("--collection", default="phisearch")
    ap.add_argument("--out", type=Path, default=Path("bench/results/recon_fidelity.json"))
    args = ap.parse_args()

    cfg = StoreConfig(path=args.store, collection=args.collection)
    with open_store(cfg) as st:
        meta = st.meta()
    if meta is None:
        raise SystemExit(f"no collection {args.collection} in {args.store}: run idx build first")
    emb = embedder_for(meta, "cpu")   # the whole identity checked (a refitted readout too)
    model = emb.checkpoint.model.eval()
    imgs, labels, keys = load_split(args.queries)
    pick = balanced(labels, args.targets)
    imgs, labels, keys = imgs[pick], labels[pick], [keys[i] for i in pick]
    ids = [point_id(*k.split("/", 1)) for k in keys]
    over = {"levels": args.levels, "inner_steps": args.inner_steps, "lr": args.lr,
            "tol": args.tol}
    sch = R.schedule(args.schedule, **over)
    unguided_sch = R.schedule(args.schedule, **dict(over, inner_steps=0))

    t0 = time.perf_counter()
    guided, errors = [], []
    for i in range(0, len(imgs), args.batch_targets):
        rec = R.reconstruct(model, images=imgs[i:i + args.batch_targets], n=args.n, sch=sch,
                            seed=args.seed + i, phi_config=emb.phi)
        guided.append(as_uint8(rec.samples))
        errors.extend(rec.phi_rel_error.tolist())
        print(f"guided: {min(i + args.batch_targets, len(imgs))}/{len(imgs)} targets "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    t_guided = time.perf_counter() - t0
    guided_u8 = np.concatenate(guided)
    t0 = time.perf_counter()
    rec = R.reconstruct(model, None, n=len(guided_u8), sch=unguided_sch, seed=args.seed + 10_000)
    unguided_u8 = as_uint8(rec.samples)
    t_unguided = time.perf_counter() - t0

    target_of = np.repeat(np.arange(len(imgs)), args.n)
    with open_store(StoreConfig(path=args.store, collection=args.collection, busy_wait=60)) as st:
        g_vec, _ = emb(guided_u8)
        u_vec, _ = emb(unguided_u8)
        r_vec, _ = emb(imgs)
        skip = [ids[t] for t in target_of]
        g_maj = top10_majority(st, g_vec, skip)
        u_maj = top10_majority(st, u_vec, skip)
        r_maj = top10_majority(st, r_vec, ids)
    want = labels[target_of]
    g_ok = np.array([m == w for m, w in zip(g_maj, want)])
    u_ok = np.array([m == w for m, w in zip(u_maj, want)])
    r_ok = np.array([m == w for m, w in zip(r_maj, labels)])
    per_target = np.array([majority([g_maj[j] for j in np.flatnonzero(target_of == t)]) == labels[t]
                           for t in range(len(imgs))])
    result = {
        "store": args.store, "collection": args.collection, "points": None,
        "checkpoint": meta.get("checkpoint"), "model_sha256": meta["model_sha256"],
        "readout": meta.get("readout"), "phi": {k: meta[k] for k in ("sigma", "draws", "seed")},
        "targets": len(imgs), "samples_per_target": args.n, "classes": len(np.unique(labels)),
        "schedule": args.schedule, "schedule_settings": asdict(sch),
        "guided_top10_majority_is_target_class": round(float(g_ok.mean()), 4),
        "guided_per_target_majority_of_samples": round(float(per_target.mean()), 4),
        "unguided_top10_majority_is_target_class": round(float(u_ok.mean()), 4),
        "real_image_top10_majority_is_its_class": round(float(r_ok.mean()), 4),
        "median_phi_rel_error": round(float(np.median(errors)), 4),
        "seconds": {"guided": round(t_guided, 1), "unguided": round(t_unguided, 1),
                    "guided_per_sample": round(t_guided / len(guided_u8), 2)},
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
    }
    with open_store(cfg) as st:
        result["points"] = st.count()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"| samples | top-10 majority = target class |\n|---|---|\n"
          f"| guided ({args.n} per target, {args.schedule}) | {g_ok.mean():.3f} |\n"
          f"| unguided sampler | {u_ok.mean():.3f} |\n"
          f"| the real target image (ceiling) | {r_ok.mean():.3f} |")
    print(f"per target (majority over its samples): {per_target.mean():.3f}; median φ rel error "
          f"{np.median(errors):.3f}; guided {t_guided:.0f} s, unguided {t_unguided:.0f} s; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
