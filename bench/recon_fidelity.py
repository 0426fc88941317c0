"""Do reconstructions carry the target's meaning? (issue 5, SPEC §4)

For T labelled test images (balanced over classes), draw N guided samples each (σ-matched mode,
the `fast` schedule, the collection's checkpoint), embed every sample with the collection's own
readout and φ settings, and search the index: a sample "keeps the class" when the majority label
of its top-10 is the target's label. The target's own point is left out of the hits. Beside it,
the same for N unguided samples per target (the plain sampler, same levels, no guidance) — what
chance looks like for images of this sampler — and the target image's own top-10 majority (the
ceiling: retrieval from the real image).

    python bench/recon_fidelity.py --queries $D/imagenette-test-000000.tar --targets 50 -n 4

Writes bench/results/recon_fidelity.json. The functions below are also what
bench/recon_schedules.py scores several schedules with.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from phisearch.indexer.cli.common import default_store
from phisearch.indexer.model.embedder import Embedder
from phisearch.indexer.model.phi import as_uint8
from phisearch.indexer.model.unet import UNet
from phisearch.indexer.store import StoreConfig, open_store, point_id
from phisearch.search import recon_report
from phisearch.search import reconstruct as R
from phisearch.search.evaluate import load_split
from phisearch.search.query import embedder_for

UNGUIDED_SEED_OFFSET = 10_000    # unguided samples draw from seed + this (guided: seed + target)


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


@dataclass
class Targets:
    """The labelled test images reconstructed, and the ids of their own points (left out)."""

    images: np.ndarray      # (T, 64, 64, 3) uint8
    labels: np.ndarray      # (T,)
    keys: list[str]
    ids: list[str]


def load_targets(queries: str, total: int) -> Targets:
    """`total` images of the shards, balanced over classes (balanced())."""
    imgs, labels, keys = load_split(queries)
    pick = balanced(labels, total)
    keys = [keys[i] for i in pick]
    return Targets(imgs[pick], labels[pick], keys, [point_id(*k.split("/", 1)) for k in keys])


def open_collection(cfg: StoreConfig) -> tuple[dict, Embedder]:
    """The collection's metadata and its embedder (the whole identity checked, a refitted
    readout too); exits with one line when there is no collection."""
    with open_store(cfg) as st:
        meta = st.meta()
    if meta is None:
        raise SystemExit(f"no collection {cfg.collection} in {cfg.path or cfg.url}: run idx "
                         "build first")
    return meta, embedder_for(meta, "cpu")


def unguided(sch: R.Schedule) -> R.Schedule:
    """The same sampler with no guidance: what chance looks like for its images."""
    return replace(sch, inner_steps=0)


def draw_guided(model: UNet, images: np.ndarray, n: int, sch: R.Schedule, seed: int,
                emb: Embedder, batch_targets: int = 10,
                progress: Callable[[str], None] | None = print
                ) -> tuple[np.ndarray, list[float], float]:
    """n σ-matched samples per target image, target-major, in batches of targets (batch i
    seeded seed + i): (samples (T n, H, W, 3) uint8, φ relative errors, seconds)."""
    t0 = time.perf_counter()
    out, errors = [], []
    for i in range(0, len(images), batch_targets):
        rec = R.reconstruct(model, images=images[i:i + batch_targets], n=n, sch=sch,
                            seed=seed + i, phi_config=emb.phi)
        out.append(as_uint8(rec.samples))
        errors.extend(rec.phi_rel_error.tolist())
        if progress is not None:
            progress(f"guided: {min(i + batch_targets, len(images))}/{len(images)} targets "
                     f"({time.perf_counter() - t0:.0f} s)")
    return np.concatenate(out), errors, time.perf_counter() - t0


def draw_unguided(model: UNet, count: int, sch: R.Schedule, seed: int
                  ) -> tuple[np.ndarray, float]:
    """count samples of sch without guidance, one batch seeded seed + UNGUIDED_SEED_OFFSET:
    (samples uint8, seconds)."""
    t0 = time.perf_counter()
    rec = R.reconstruct(model, None, n=count, sch=unguided(sch),
                        seed=seed + UNGUIDED_SEED_OFFSET)
    return as_uint8(rec.samples), time.perf_counter() - t0


def keeps_class(store, emb: Embedder, samples: np.ndarray, want: np.ndarray,
                exclude: list[str]) -> tuple[np.ndarray, list[object], np.ndarray]:
    """Per image: does the majority label of its top 10 (the `exclude` point left out) equal
    `want`? (ok (N,) bool, majorities, middle-block means (N, C) of the images.)"""
    vec, mid = emb(samples)
    maj = top10_majority(store, vec, exclude)
    return np.array([m == w for m, w in zip(maj, want)], bool), maj, mid


def per_target_majority(maj: list[object], labels: np.ndarray, n: int) -> np.ndarray:
    """(T,) does the majority over each target's n samples' majorities equal its label?"""
    return np.array([majority(maj[t * n:(t + 1) * n]) == labels[t] for t in range(len(labels))])


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
    meta, emb = open_collection(cfg)
    model = emb.checkpoint.model.eval()
    tg = load_targets(args.queries, args.targets)
    imgs, labels = tg.images, tg.labels
    over = {"levels": args.levels, "inner_steps": args.inner_steps, "lr": args.lr,
            "tol": args.tol}
    sch = R.schedule(args.schedule, **over)

    guided_u8, errors, t_guided = draw_guided(
        model, imgs, args.n, sch, args.seed, emb, args.batch_targets,
        progress=lambda s: print(s, flush=True))
    unguided_u8, t_unguided = draw_unguided(model, len(guided_u8), sch, args.seed)

    target_of = np.repeat(np.arange(len(imgs)), args.n)
    want, skip = labels[target_of], [tg.ids[t] for t in target_of]
    with open_store(StoreConfig(path=args.store, collection=args.collection, busy_wait=60)) as st:
        g_ok, g_maj, _ = keeps_class(st, emb, guided_u8, want, skip)
        u_ok, _, _ = keeps_class(st, emb, unguided_u8, want, skip)
        r_ok, _, _ = keeps_class(st, emb, imgs, labels, tg.ids)
    per_target = per_target_majority(g_maj, labels, args.n)
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
