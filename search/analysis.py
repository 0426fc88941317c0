"""The analyses of SPEC §3 on any checkpoint, as numbers (analyze.py draws and reports them).

- Sparsity per block: participation ratio PR(v) = (Σ_c v_c)² / (C Σ_c v_c²) ∈ [1/C, 1] of the
  spatially averaged channel vector v ≥ 0 at every block's input and output (1 = every channel
  equally active, 1/C = one channel).
- Stability across noise: cosine between ā_k(x; σ1) and ā_k(x; σ2) per block, σ1 fixed, σ2
  swept; the σ2 passes use another noise seed, so the point σ2 = σ1 shows the noise floor.
- Channel selectivity: the PR of each middle-block channel across images (low = selective,
  active for few images; high = common), and the images that most activate the most selective.
- Union of subspaces: two label groups, their specific channels and the channels they share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from phisearch.indexer.model.phi import participation_ratio

BLOCKS = ("E1", "E2", "E3", "M", "D3", "D2", "D1")
TAPS = tuple(f"{b}.{side}" for b in BLOCKS for side in ("in", "out"))
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class AnalyzeConfig:
    images: int = 512                   # images read from the shards (the first N, in order)
    sigma: float = 0.2                  # σ of the main pass (and σ1 of the stability sweep)
    draws: int = 1                      # noisy copies averaged per image and σ
    seed: int = 0
    sweep: tuple[float, ...] = (0.0, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8)  # σ2 values
    stability_images: int = 128         # images used by the σ2 sweep (a pass per σ2)
    top_channels: int = 4               # selective channels shown with their top images
    tiles: int = 8                      # images per selective channel
    min_active: int = 5                 # a channel must be on in this many images to be ranked
    batch_size: int = 32
    dpi: int = 80


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (N, C) arrays (0 where a row is all zero)."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na * nb, 1e-12)


def load_images(urls: Sequence[str], limit: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The first `limit` samples: images (N, 64, 64, 3) uint8, labels (N,) int (-1 = none),
    label names by label."""
    from phisearch.indexer.sources.loader import first_samples
    from phisearch.indexer.sources.shards import expand

    samples = first_samples(expand(urls), limit)
    labels = [-1 if s.label is None else int(s.label) for s in samples]
    names = {int(s.label): s.label_name or str(s.label) for s in samples if s.label is not None}
    label_names = [names.get(i, str(i)) for i in range(max(labels) + 1)] if names else []
    return np.stack([s.image for s in samples]), np.asarray(labels), label_names


def embed(model, images: np.ndarray, sigma: float, cfg: AnalyzeConfig, seed: int,
          taps: Sequence[str], on_batch: Callable[[int], None] | None = None
          ) -> dict[str, np.ndarray]:
    """Spatial means of the taps: {tap: (N, C) float32}."""
    from phisearch.indexer.model.phi import features

    parts: dict[str, list[np.ndarray]] = {t: [] for t in taps}
    for i in range(0, len(images), cfg.batch_size):
        got = features(model, images[i:i + cfg.batch_size], sigma, cfg.draws, seed, tuple(taps))
        for t in taps:
            parts[t].append(got[t].numpy())
        if on_batch:
            on_batch(min(i + cfg.batch_size, len(images)))
    return {t: np.concatenate(p) for t, p in parts.items()}


@dataclass
class Analysis:
    """The numbers behind the figures (arrays are per image or per channel)."""

    pr: dict[str, np.ndarray]           # tap -> (N,) PR per image
    dead: dict[str, int]                # tap -> channels never active over the images
    stability: dict[str, list[float]]   # block -> mean cosine per σ2 (block outputs)
    stability_c: dict[str, list[float]]  # the same after subtracting the mean over images
    channel_pr: np.ndarray              # (C,) PR of each middle-block channel across images
    active_images: np.ndarray           # (C,) images in which each channel is on
    mid: np.ndarray                     # (N, C) middle-block means of the main pass
    selective: list[int]                # the most selective channels (shown)
    groups: dict                        # union-of-subspaces numbers


def compute(model, images: np.ndarray, labels: np.ndarray, cfg: AnalyzeConfig,
            on_progress: Progress | None = None) -> Analysis:
    n = len(images)

    def stage(name: str, total: int) -> Callable[[int], None]:
        return lambda done: on_progress(name, done, total) if on_progress else None

    main = embed(model, images, cfg.sigma, cfg, cfg.seed, TAPS, stage("blocks", n))
    pr = {t: participation_ratio(main[t]) for t in TAPS}
    dead = {t: int((np.abs(main[t]).max(0) == 0).sum()) for t in TAPS}
    m = min(cfg.stability_images, n)
    outs = [f"{b}.out" for b in BLOCKS]
    stability: dict[str, list[float]] = {b: [] for b in BLOCKS}
    centred: dict[str, list[float]] = {b: [] for b in BLOCKS}
    for j, s2 in enumerate(cfg.sweep):
        other = embed(model, images[:m], s2, cfg, cfg.seed + 1, outs)
        for b in BLOCKS:
            x, y = main[f"{b}.out"][:m], other[f"{b}.out"]
            stability[b].append(float(cosine(x, y).mean()))
            # what is left once the part shared by every image is removed
            centred[b].append(float(cosine(x - x.mean(0), y - y.mean(0)).mean()))
        if on_progress:
            on_progress("sigma sweep", j + 1, len(cfg.sweep))
    mid = main["M.out"]
    active = (mid > 0).sum(0)
    cpr = participation_ratio(mid, axis=0)
    ranked = [int(c) for c in np.argsort(np.nan_to_num(cpr, nan=2.0), kind="stable")
              if active[c] >= min(cfg.min_active, n)]
    return Analysis(pr, dead, stability, centred, cpr, active, mid, ranked[:cfg.top_channels],
                    union_of_subspaces(mid, labels))


def most_separated_pair(mid: np.ndarray, labels: np.ndarray, min_size: int = 10
                        ) -> tuple[int, int] | None:
    """The two labels whose φ groups are farthest apart in units of their spread: Δ/s, with Δ
    the distance between the group means and s the pooled std along the line joining them."""
    vals, counts = np.unique(labels[labels >= 0], return_counts=True)
    vals = vals[counts >= min(min_size, counts.max(initial=0))]
    best, pair = -1.0, None
    for i, a in enumerate(vals):
        for b in vals[i + 1:]:
            xa, xb = mid[labels == a], mid[labels == b]
            d = xa.mean(0) - xb.mean(0)
            u = d / max(float(np.linalg.norm(d)), 1e-12)
            s = np.sqrt((np.var(xa @ u) + np.var(xb @ u)) / 2)
            sep = float(np.linalg.norm(d) / max(s, 1e-12))
            if sep > best:
                best, pair = sep, (int(a), int(b))
    return pair


def union_of_subspaces(mid: np.ndarray, labels: np.ndarray, per_set: int = 8) -> dict:
    """Two label groups A, B (the most separated pair): the channels specific to each (largest
    (m_A - m_B) / sqrt(m_A + m_B), a difference that also weighs how active the channel is),
    the channels common to both (largest min(m_A, m_B)), and how much of each group's φ energy
    Σ φ_c² lies on each set."""
    pair = most_separated_pair(mid, labels)
    if pair is None:
        return {}
    a, b = pair
    ma, mb = mid[labels == a].mean(0), mid[labels == b].mean(0)
    per_set = max(1, min(per_set, mid.shape[1] // 3))
    common = np.argsort(-np.minimum(ma, mb), kind="stable")[:per_set]
    rest = np.setdiff1d(np.arange(mid.shape[1]), common)
    score = ((ma - mb) / np.sqrt(ma + mb + 1e-6))[rest]
    spec_a = rest[np.argsort(-score, kind="stable")][:per_set]
    spec_a = spec_a[(ma > mb)[spec_a]]
    spec_b = rest[np.argsort(score, kind="stable")][:per_set]
    spec_b = spec_b[(mb > ma)[spec_b]]

    def share(group: int, chans: np.ndarray) -> float:
        e = mid[labels == group].astype(np.float64) ** 2
        return float((e[:, chans].sum(1) / np.maximum(e.sum(1), 1e-12)).mean())

    return {"a": a, "b": b, "n_a": int((labels == a).sum()), "n_b": int((labels == b).sum()),
            "common": common.tolist(), "specific_a": spec_a.tolist(),
            "specific_b": spec_b.tolist(), "mean_a": ma.tolist(), "mean_b": mb.tolist(),
            "energy": {f"{g}_on_{name}": round(share(grp, chans), 4)
                       for g, grp in (("a", a), ("b", b))
                       for name, chans in (("specific_a", spec_a), ("specific_b", spec_b),
                                           ("common", common))},
            "channels": mid.shape[1]}


