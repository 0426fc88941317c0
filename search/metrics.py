"""Retrieval and clustering metrics of vectors (Euclidean distance throughout).

- retrieval of each query against the gallery: `knn@1`, `knn@10` (majority vote of the 10
  nearest, ties go to the tied label met first), `p@10` (fraction of the 10 nearest sharing the
  query's label), `map` (mean average precision over the whole gallery ranking). A gallery item
  with the query's own key (the same image) is left out of that query's ranking.
- clustering of the query set: k-means with k = number of classes -> `nmi`, `ari`, `purity`.
- separation Δ/s (SPEC §3) of pairs of groups: Δ = distance between the two centroids,
  s = pooled within-group std of the points projected on the unit vector joining them; the
  median over all class pairs and over all k-means cluster pairs.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

METRICS = ("knn@1", "knn@10", "p@10", "map", "nmi", "ari", "purity")


def _sqdist(q: torch.Tensor, g: torch.Tensor, g_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (Q, G), float64 accumulate for stable ranking."""
    d = (q * q).sum(1, keepdim=True) - 2.0 * (q @ g.T) + g_sq[None, :]
    return d.clamp_min_(0.0)


def retrieval_metrics(q: np.ndarray, q_labels: np.ndarray, g: np.ndarray, g_labels: np.ndarray,
                      exclude: np.ndarray | None = None, k: int = 10, chunk: int = 256
                      ) -> dict[str, float]:
    """knn@1, knn@k and p@k (reported as knn@10, p@10), and mAP of queries against a gallery.
    `exclude[i]` = gallery index to leave out of query i's ranking (its own copy), or -1."""
    qt = torch.from_numpy(np.ascontiguousarray(q, np.float64))
    gt = torch.from_numpy(np.ascontiguousarray(g, np.float64))
    gl = torch.from_numpy(np.asarray(g_labels, np.int64))
    ql = torch.from_numpy(np.asarray(q_labels, np.int64))
    g_sq = (gt * gt).sum(1)
    k = min(k, len(g) - (1 if exclude is not None and (exclude >= 0).any() else 0))
    n_labels = int(max(gl.max().item(), ql.max().item())) + 1
    knn1 = knnk = pk = ap_sum = 0.0
    ap_n = 0
    for s in range(0, len(q), chunk):
        d = _sqdist(qt[s:s + chunk], gt, g_sq)
        rows = torch.arange(d.shape[0])
        valid = torch.ones_like(d, dtype=torch.bool)
        if exclude is not None:
            ex = torch.from_numpy(np.asarray(exclude[s:s + chunk], np.int64))
            has = ex >= 0
            d[rows[has], ex[has]] = float("inf")
            valid[rows[has], ex[has]] = False
        order = torch.argsort(d, dim=1, stable=True)
        ranked = gl[order]                                   # (B, G) labels by rank
        ranked_valid = torch.gather(valid, 1, order)
        qlab = ql[s:s + chunk]
        rel = (ranked == qlab[:, None]) & ranked_valid        # (B, G)
        knn1 += (ranked[:, 0] == qlab).sum().item()
        top = ranked[:, :k]
        pk += rel[:, :k].float().mean(1).sum().item()
        # Majority vote; ties -> the tied label whose first appearance is nearest.
        counts = torch.zeros((len(top), n_labels), dtype=torch.long)
        counts.scatter_add_(1, top, torch.ones_like(top))
        best = counts.max(1, keepdim=True).values
        tied = counts.gather(1, top) == best                   # (B, k): rank holds a top label
        first = tied.float().argmax(1)                         # the nearest such rank
        vote = top[rows, first]
        knnk += (vote == qlab).sum().item()
        # Average precision over the whole ranking.
        relf = rel.double()
        hits = relf.cumsum(1)
        ranks = torch.arange(1, rel.shape[1] + 1, dtype=torch.float64)
        n_rel = relf.sum(1)
        ap = (hits / ranks * relf).sum(1) / n_rel.clamp_min(1)
        ap_sum += ap[n_rel > 0].sum().item()
        ap_n += int((n_rel > 0).sum().item())
    n = len(q)
    # Keys are fixed (CONTRACT); k is 10 unless the gallery is smaller.
    return {"knn@1": knn1 / n, "knn@10": knnk / n, "p@10": pk / n, "map": ap_sum / max(ap_n, 1)}


def kmeans(x: np.ndarray, k: int, seed: int = 0, n_init: int = 4) -> np.ndarray:
    from sklearn.cluster import KMeans

    k = max(1, min(k, len(x)))
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(
        np.asarray(x, np.float32))


def cluster_metrics(labels: np.ndarray, assign: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
    from sklearn.metrics.cluster import contingency_matrix

    cm = contingency_matrix(labels, assign)
    return {"nmi": float(normalized_mutual_info_score(labels, assign)),
            "ari": float(adjusted_rand_score(labels, assign)),
            "purity": float(cm.max(axis=0).sum() / cm.sum())}


def separation(a: np.ndarray, b: np.ndarray) -> float:
    """Δ/s of two groups: centroid distance over the pooled within-group std along the line
    joining the centroids (SPEC §3). inf when both groups are flat along it."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    diff = a.mean(0) - b.mean(0)
    delta = float(np.linalg.norm(diff))
    if delta == 0.0:
        return 0.0
    u = diff / delta
    pa, pb = a @ u, b @ u
    dof = max(len(a) + len(b) - 2, 1)
    s = float(np.sqrt((((pa - pa.mean()) ** 2).sum() + ((pb - pb.mean()) ** 2).sum()) / dof))
    return delta / s if s > 0 else float("inf")


def median_separation(x: np.ndarray, groups: np.ndarray, min_size: int = 2) -> float:
    """Median Δ/s over all pairs of groups with at least `min_size` points (nan if < 2 groups)."""
    ids = [gid for gid in np.unique(groups) if (groups == gid).sum() >= min_size]
    vals = [separation(x[groups == i], x[groups == j]) for i, j in itertools.combinations(ids, 2)]
    return float(np.median(vals)) if vals else float("nan")


def score(q: np.ndarray, q_labels: np.ndarray, g: np.ndarray, g_labels: np.ndarray,
          exclude: np.ndarray | None = None, kmeans_seed: int = 0, n_init: int = 4,
          k: int = 10) -> tuple[dict[str, float], dict[str, float]]:
    """All METRICS and the separation {"classes", "clusters"} of one representation."""
    m = retrieval_metrics(q, q_labels, g, g_labels, exclude, k=k)
    n_classes = len(np.unique(q_labels))
    assign = kmeans(q, n_classes, kmeans_seed, n_init)
    m.update(cluster_metrics(q_labels, assign))
    sep = {"classes": median_separation(q, q_labels), "clusters": median_separation(q, assign)}
    return {key: float(v) for key, v in m.items()}, sep
