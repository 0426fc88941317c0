"""`idx cluster`: HDBSCAN or k-means over a collection's stored φ, labels written back.

Every point gets `cluster_id` (int, -1 = noise) and `cluster_prob` (membership strength in
[0, 1]); a summary document "clusters" holds each cluster's size, centroids, exemplars and most
distinctive middle-block channels (CONTRACT.md). Re-running overwrites both payload keys on
every point and replaces the document, so labels never accumulate.

Scale: above `sample_above` points the clusterer is fitted on a random sample of that size and
the other points are assigned to the fitted clusters (HDBSCAN `approximate_predict`, k-means
nearest centroid), chunk by chunk with progress.

Membership strength: HDBSCAN's own `probabilities_` (1 = in the cluster's core, 0 = noise);
k-means has none, so it is the margin 1 - d1/d2 between the nearest (d1) and second-nearest (d2)
centroid (1 = on a centroid, 0 = on a boundary). Stored rounded to 0.01, so that the payload
writes group into at most ~101 updates per cluster.

Clustering reads the collection's own dense readout, whatever the collection was built with
(its meta's `readout`); the shipped small64's default readout is blocks+white256+l2 (256-d,
whitened and unit length already, so `auto` below is l2 and changes nothing).

Defaults, measured with bench/cluster_preprocess.py (NMI against the 10 labels, HDBSCAN noise
counted as one more group) on indexes built by earlier models than the one shipped now, each
named by its weights' sha256 and readout as its JSON records them:
A. the imagenette index: all 13,394 imagenette-64 images (model 1072c3c691b4, readout
   blocks+white64: 64-d, PCA-whitened; bench/results/cluster_preprocess.json);
B. 2,000 test images (model 65c23d8d1ac7, fp32, the paper's readout mid: 256-d, raw;
   bench/results/cluster_preprocess_mid.json).
- The default preprocessing, auto, is l2 for whitened readouts and pca (32 dims) otherwise.
  l2 (unit length) on A gives HDBSCAN the highest NMI and the least noise (leaf/10/1: NMI
  0.077 with 91% noise, vs 0.048 / 95% raw and 0.035 / 96% pca32;
  leaf/5/1: 0.136 / 83% vs 0.086 / 92% raw) and k-means the same NMI as raw (k=10: 0.122 vs
  0.119; k=100: 0.151 vs 0.156). pca hurts on A (k-means k=100: 0.124 with 32 dims, 0.089 with
  16): a whitened readout has the same variance in every direction, so dropping dimensions drops
  information. On B, where PC1 holds 95.5% of the variance and 152 of 256 channels never fire,
  the three are close (HDBSCAN leaf/10/1: NMI 0.057 l2, 0.062 raw, 0.061 pca32; k-means k=100:
  0.130, 0.114, 0.122) but l2 leaves more noise (83% vs 69%), and HDBSCAN runs 10-50x slower in
  256 dims than in 32 (2-8 s vs 0.1-0.2 s for 2,000 points; bench/cluster_scale.py: 34 s vs
  4 s at 10k synthetic points, and l2 at 100k had not finished after 8 minutes where pca32
  takes 36 s in all): pca for such collections.
- HDBSCAN runs in a 10-d UMAP projection (30 neighbours, min_dist 0; `projection` auto), eom
  selection, min_samples 1, min_cluster_size n/250 between 5 and 50 (`auto_min_size`).
  Measured on the same 13,394 images indexed at 128-d (model 06f527fd58fa, readout
  blocks+white128+l2; bench/results/cluster_default.json, made by bench/cluster_default.py;
  docs/results.md): the old default (leaf/10/1 in the l2 space) left 89% noise in 70 clusters
  (NMI 0.097, ARI 0.001). φ has no density structure HDBSCAN can use in the full space, nor
  in PCA: a whitened readout has a flat spectrum (1.2% of the variance per axis), and with PCA
  to 5-15 dims eom finds no cluster at all and leaf 86-99% noise. UMAP's neighbour graph
  makes neighbourhoods dense: eom/50/1 there gives 38-56 clusters with 43-47% noise, NMI
  0.151-0.160 and ARI 0.014-0.026 in each of six projections (5/10/15 dims, 15/30 neighbours,
  three seeds). Settings with larger min_samples or min_cluster_size sometimes collapse into
  2-7 clusters (eom/100/1, eom/50/5), smaller ones cross 50% noise in some projections, and
  leaf/10/1 gives 300+ clusters of about 20 points (NMI 0.175 but ARI 0.003).
  k-means labels every point; in the UMAP space (`--method kmeans --projection umap`) it also
  scores higher (k=20: NMI 0.158, ARI 0.075; k=50: NMI 0.167), so it is the tool when every
  image must be in a cluster; `auto` keeps k-means in the full space.
Low NMI is expected in part: the paper finds φ clusters share layout and texture ("gist") and
are only partly aligned with class labels.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from phisearch.indexer.manage.aliases import missing_collection
from phisearch.indexer.model.embedder import dense_of
from phisearch.indexer.model.readout import principal_axes
from phisearch.indexer.store import CLUSTERS_DOC, Store, StoreConfig, StoreError, open_store

log = logging.getLogger(__name__)

DOC = CLUSTERS_DOC
METHODS = ("hdbscan", "kmeans")
PREPROCESS = ("auto", "raw", "l2", "pca")
PROJECTIONS = ("auto", "none", "umap")
SELECTIONS = ("eom", "leaf")
Progress = Callable[[str, int, int], None]   # (stage, done, total)


@dataclass(frozen=True)
class ClusterConfig:
    method: str = "hdbscan"          # hdbscan | kmeans
    min_cluster_size: int | None = None  # HDBSCAN: smallest cluster (None: auto_min_size)
    min_samples: int | None = 1      # HDBSCAN: density smoothing (None = min_cluster_size)
    selection: str = "eom"           # HDBSCAN: eom (fewer, larger) | leaf (many small)
    k: int = 100                     # k-means: clusters (clamped to the number of points)
    preprocess: str = "auto"         # auto | raw | l2 | pca: the vectors' preparation
    pca_dims: int = 32               # dimensions kept by `pca`
    projection: str = "auto"         # auto (umap for hdbscan, none for kmeans) | none | umap
    proj_dims: int = 10              # dimensions of the projection clusters are found in
    neighbors: int = 30              # UMAP n_neighbors (clamped to the points - 1)
    sample_above: int = 20000        # fit on a random sample of this size above it
    seed: int = 0                    # sample, PCA and k-means++ seeds
    exemplars: int = 5               # keys closest to each centroid kept in the summary
    channels: int = 8                # distinctive middle-block channels kept per cluster
    write_batch: int = 4096          # points per set_payload call

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f'unknown method "{self.method}"; use {" or ".join(METHODS)}')
        if self.preprocess not in PREPROCESS:
            raise ValueError(f'unknown preprocess "{self.preprocess}"; use {", ".join(PREPROCESS)}')
        if self.selection not in SELECTIONS:
            raise ValueError(f'unknown selection "{self.selection}"; use eom or leaf')
        if self.projection not in PROJECTIONS:
            raise ValueError(f'unknown projection "{self.projection}"; use '
                             f'{", ".join(PROJECTIONS)}')
        if self.min_cluster_size is not None and self.min_cluster_size < 2:
            raise ValueError("min_cluster_size must be >= 2")
        if min(self.k, self.pca_dims, self.proj_dims) < 1 or self.sample_above < 2 \
                or self.neighbors < 2:
            raise ValueError("k, pca_dims, proj_dims must be >= 1, neighbors and sample_above "
                             ">= 2")


@dataclass
class Vectors:
    """What clustering reads from the store: one row per point."""

    ids: list[str]
    keys: list[str | None]
    labels: list[int | None]
    label_names: list[str | None]
    dense: np.ndarray   # (N, D) float32: the collection's `phi`
    mid: np.ndarray     # (N, C) float32: middle-block means, from `phi_sparse`


def read_vectors(store: Store, sparse_dim: int | None = None,
                 on_progress: Progress | None = None) -> Vectors:
    """Every point's dense and sparse vectors and its key/label (one scroll)."""
    total = store.count()
    ids, keys, labels, names, dense, sparse = [], [], [], [], [], []
    for h in store.scroll(with_vectors=True, batch=1024):
        if h.vector is None:
            raise StoreError(f"point {h.id} has no dense vector")
        ids.append(h.id)
        keys.append(h.payload.get("key"))
        labels.append(h.payload.get("label"))
        names.append(h.payload.get("label_name"))
        dense.append(h.vector)
        sparse.append(h.sparse or ([], []))
        if on_progress and len(ids) % 1024 == 0:
            on_progress("read", len(ids), total)
    if sparse_dim is None:
        sparse_dim = 1 + max((max(i) for i, _ in sparse if len(i)), default=0)
    mid = dense_of(sparse, sparse_dim)
    dim = len(dense[0]) if dense else 0
    if on_progress:
        on_progress("read", len(ids), total)
    return Vectors(ids, keys, labels, names,
                   np.stack(dense).astype(np.float32) if dense else np.zeros((0, dim), np.float32),
                   mid)


def resolve_preprocess(how: str, readout: str | None) -> str:
    """auto: l2 for a whitened readout (every direction has the same variance, so a PCA would
    drop information), pca for a raw one (a few directions dominate; PCA keeps them and makes
    HDBSCAN 10-50x faster). See the measurements above."""
    if how != "auto":
        return how
    return "l2" if "+white" in (readout or "") else "pca"


@dataclass
class Preprocessor:
    """raw: as stored; l2: unit length (direction only); pca: centred, projected on the top
    `dims` principal axes of the fit sample (not whitened, so distances keep their scale)."""

    how: str
    mean: np.ndarray | None = None
    proj: np.ndarray | None = None   # (D, dims)

    @classmethod
    def fit(cls, x: np.ndarray, how: str, dims: int) -> Preprocessor:
        if how != "pca":
            return cls(how)
        pca = principal_axes(x, dims)
        return cls(how, pca.mean_.astype(np.float32), pca.components_.T.astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if self.how == "l2":
            return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        if self.how == "pca":
            return (x - self.mean) @ self.proj
        return x


def resolve_projection(cfg: ClusterConfig) -> str:
    """auto: umap for HDBSCAN (φ has no density structure HDBSCAN can use in the full space: the
    measured default left 90% noise), none for k-means (it needs no density)."""
    if cfg.projection != "auto":
        return cfg.projection
    return "umap" if cfg.method == "hdbscan" else "none"


def auto_min_size(n: int) -> int:
    """Default HDBSCAN min_cluster_size for n fitted points: 50 from 12,500 points on (measured
    on 13,394), n/250 below, at least 5, so that a small collection still gets clusters."""
    return max(5, min(50, n // 250))


@dataclass
class Projection:
    """The low-dimensional space HDBSCAN runs in: a UMAP embedding (min_dist 0, so neighbours
    pack densely) fitted on the fit sample; other points are placed by UMAP's transform."""

    how: str
    model: object | None = None

    @classmethod
    def fit(cls, z: np.ndarray, cfg: ClusterConfig) -> tuple[Projection, np.ndarray]:
        """Fit on z (the fit sample); returns the projection and z's embedding. Too few points
        for a neighbour graph (<= proj_dims + 2) are left as they are (how "none")."""
        how = resolve_projection(cfg)
        if how == "none" or len(z) <= cfg.proj_dims + 2:
            return cls("none"), z
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # "n_jobs overridden by random_state" and the like
            import umap

            model = umap.UMAP(n_components=cfg.proj_dims, n_neighbors=min(cfg.neighbors,
                              len(z) - 1), min_dist=0.0, random_state=cfg.seed, n_jobs=1)
            y = model.fit_transform(z)
        return cls(how, model), np.asarray(y, np.float32)

    def name(self, cfg: ClusterConfig) -> str:
        return "none" if self.how == "none" else f"{self.how}{cfg.proj_dims}"

    def __call__(self, z: np.ndarray) -> np.ndarray:
        if self.model is None:
            return z
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(self.model.transform(z), np.float32)


def project(z: np.ndarray, cfg: ClusterConfig, on_progress: Progress | None = None
            ) -> tuple[np.ndarray, Projection]:
    """Every point in the projection fitted on the fit sample (fit_sample's rows)."""
    fit_idx = fit_sample(len(z), cfg)
    if on_progress:
        on_progress("project", 0, len(z))
    proj, y_fit = Projection.fit(z[fit_idx], cfg)
    y = np.zeros((len(z), y_fit.shape[1]), np.float32)
    y[fit_idx] = y_fit
    rest = np.setdiff1d(np.arange(len(z)), fit_idx)
    for i in range(0, len(rest), 4096):
        y[rest[i:i + 4096]] = proj(z[rest[i:i + 4096]])
    if on_progress:
        on_progress("project", len(z), len(z))
    return y, proj


def fit_sample(n: int, cfg: ClusterConfig) -> np.ndarray:
    """Sorted indices of the points the clusterer (and the PCA) is fitted on."""
    if n <= cfg.sample_above:
        return np.arange(n)
    return np.sort(np.random.default_rng(cfg.seed).choice(n, cfg.sample_above, replace=False))


def _kmeans_strength(d: np.ndarray) -> np.ndarray:
    """1 - d1/d2 from (n, k) distances to the centroids (1.0 when k == 1)."""
    if d.shape[1] < 2:
        return np.ones(len(d))
    part = np.partition(d, 1, axis=1)
    return 1.0 - part[:, 0] / np.maximum(part[:, 1], 1e-12)


def fit_assign(z: np.ndarray, cfg: ClusterConfig, on_progress: Progress | None = None
               ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Cluster (N, d) points. Returns (labels (N,) int, -1 = noise; strength (N,) in [0, 1];
    info: what was fitted on). Above cfg.sample_above points: fit on a sample, assign the rest."""
    n = len(z)
    fit_idx = fit_sample(n, cfg)
    rest = np.setdiff1d(np.arange(n), fit_idx)
    labels = np.full(n, -1, np.int64)
    strength = np.zeros(n, np.float64)
    used: dict = {}   # the HDBSCAN sizes actually used (after auto and clamping)
    if on_progress:
        on_progress("fit", 0, len(fit_idx))
    t0 = time.perf_counter()
    if cfg.method == "hdbscan":
        import hdbscan

        min_size = min(cfg.min_cluster_size or auto_min_size(len(fit_idx)),
                       max(2, len(fit_idx)))
        min_samples = None if cfg.min_samples is None else min(cfg.min_samples, min_size)
        used = {"min_cluster_size": min_size, "min_samples": min_samples}
        model = hdbscan.HDBSCAN(min_cluster_size=min_size, min_samples=min_samples,
                                cluster_selection_method=cfg.selection, prediction_data=True,
                                core_dist_n_jobs=1)
        model.fit(z[fit_idx])
        labels[fit_idx] = model.labels_
        strength[fit_idx] = model.probabilities_

        def predict(chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            lab, prob = hdbscan.approximate_predict(model, chunk)
            return lab, prob
    else:
        from sklearn.cluster import KMeans

        k = min(cfg.k, len(fit_idx))
        model = KMeans(n_clusters=k, init="k-means++", n_init=1, random_state=cfg.seed)
        model.fit(z[fit_idx])
        labels[fit_idx] = model.labels_
        strength[fit_idx] = _kmeans_strength(model.transform(z[fit_idx]))

        def predict(chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            d = model.transform(chunk)
            return d.argmin(1), _kmeans_strength(d)
    if on_progress:
        on_progress("fit", len(fit_idx), len(fit_idx))
    t1 = time.perf_counter()
    step = 4096
    for i in range(0, len(rest), step):
        idx = rest[i:i + step]
        labels[idx], strength[idx] = predict(z[idx])
        if on_progress:
            on_progress("assign", min(i + step, len(rest)), len(rest))
    labels = _renumber(labels)
    info = {"fit_points": len(fit_idx), "assigned_points": len(rest), **used,
            "fit_s": round(t1 - t0, 3), "assign_s": round(time.perf_counter() - t1, 3)}
    return labels, np.clip(strength, 0.0, 1.0), info


def _renumber(labels: np.ndarray) -> np.ndarray:
    """Cluster ids 0..K-1 by decreasing size (noise stays -1), so id 0 is the largest."""
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    order = ids[np.lexsort((ids, -counts))]
    remap = {int(old): new for new, old in enumerate(order)}
    return np.array([remap.get(int(x), -1) for x in labels], np.int64)


def summarize(v: Vectors, z: np.ndarray, labels: np.ndarray, cfg: ClusterConfig) -> list[dict]:
    """Per cluster: size, centroids (dense `phi` and middle-block means), the points nearest
    the centroid in the clustering space, the channels most above their global mean, labels."""
    global_mid = v.mid.mean(0) if len(v.mid) else np.zeros(v.mid.shape[1])
    eps = 0.01 * float(global_mid.mean()) + 1e-12   # keeps near-dead channels from dominating
    out = []
    for c in range(int(labels.max()) + 1 if len(labels) else 0):
        members = np.flatnonzero(labels == c)
        if not len(members):
            continue
        zc = z[members]
        near = members[np.argsort(((zc - zc.mean(0)) ** 2).sum(1), kind="stable")[:cfg.exemplars]]
        centroid_mid = v.mid[members].mean(0)
        lift = centroid_mid / (global_mid + eps)
        channels = np.argsort(-lift, kind="stable")[:cfg.channels]
        counts = Counter(v.label_names[i] if v.label_names[i] is not None else v.labels[i]
                         for i in members if v.labels[i] is not None)
        out.append({
            "id": c,
            "size": len(members),
            "centroid": v.dense[members].mean(0).astype(np.float32).tolist(),
            "centroid_mid": centroid_mid.astype(np.float32).tolist(),
            "exemplars": [v.keys[i] for i in near],
            "exemplar_ids": [v.ids[i] for i in near],
            "channels": [int(x) for x in channels],
            "channel_lift": [round(float(lift[x]), 3) for x in channels],
            "top_labels": [[name, n] for name, n in counts.most_common(3)],
        })
    return out


def write_labels(store: Store, ids: list[str], labels: np.ndarray, strength: np.ndarray,
                 batch: int = 4096, on_progress: Progress | None = None) -> None:
    """cluster_id and cluster_prob on every point. Points are sorted by (id, strength) so that
    a batch holds few distinct payloads (the store groups equal payloads into one update)."""
    prob = np.round(strength, 2)
    order = np.lexsort((prob, labels))
    for i in range(0, len(order), batch):
        chunk = order[i:i + batch]
        store.set_payload({ids[j]: {"cluster_id": int(labels[j]), "cluster_prob": float(prob[j])}
                           for j in chunk})
        if on_progress:
            on_progress("write", min(i + batch, len(order)), len(order))


def cluster(store_cfg: StoreConfig, cfg: ClusterConfig, on_progress: Progress | None = None
            ) -> dict:
    """Cluster the collection, write labels back, store the summary. Returns the summary doc
    (without centroids) plus the CONTRACT keys: method, clusters (count), noise, seconds."""
    t0 = time.perf_counter()
    with open_store(store_cfg) as store:
        meta = store.meta()
        if meta is None:
            raise StoreError(missing_collection(store_cfg))
        store.claim_write()   # a busy collection refuses now, not after the clustering
        n = store.count()
        if cfg.method == "kmeans" and cfg.k > n:   # k-means would quietly find fewer clusters
            raise StoreError(f"k-means cannot make {cfg.k} clusters of the {n} points in "
                             f"{store.where}: k must be at most {n}")
        v = read_vectors(store, meta.get("sparse_dim"), on_progress)
        if len(v.ids) < 2:
            raise StoreError(f"{store.where} holds {len(v.ids)} point(s): nothing to cluster")
        t_read = time.perf_counter()
        how = resolve_preprocess(cfg.preprocess, meta.get("readout"))
        prep = Preprocessor.fit(v.dense[fit_sample(len(v.ids), cfg)], how, cfg.pca_dims)
        z = prep(v.dense)
        t_prep = time.perf_counter()
        z, proj = project(z, cfg, on_progress)
        t_proj = time.perf_counter()
        labels, strength, info = fit_assign(z, cfg, on_progress)
        t_fit = time.perf_counter()
        clusters = summarize(v, z, labels, cfg)
        t_sum = time.perf_counter()
        write_labels(store, v.ids, labels, strength, cfg.write_batch, on_progress)
        seconds = time.perf_counter() - t0
        stages = {"read_s": t_read - t0, "preprocess_s": t_prep - t_read,
                  "project_s": t_proj - t_prep,
                  "fit_s": info.pop("fit_s"), "assign_s": info.pop("assign_s"),
                  "summary_s": t_sum - t_fit, "write_s": time.perf_counter() - t_sum}
        doc = {
            "method": cfg.method,
            "params": {**{k: val for k, val in asdict(cfg).items()
                          if k not in ("method", "preprocess", "write_batch")},
                       **{k: info.pop(k) for k in ("min_cluster_size", "min_samples")
                          if k in info}},
            "preprocess": how if how != "pca" else f"pca{prep.proj.shape[1]}",
            "projection": proj.name(cfg),
            "points": len(v.ids),
            **info,
            "noise": int((labels < 0).sum()),
            "stages": {k: round(x, 3) for k, x in stages.items()},
            "model_sha256": meta.get("model_sha256"),
            "readout": meta.get("readout"),
            "clusters": clusters,
            "seconds": round(seconds, 2),
            "created_at": time.time(),
        }
        store.put_doc(DOC, doc)
    result = {k: val for k, val in doc.items() if k != "clusters"}
    result["clusters"] = len(clusters)
    result["sizes"] = [c["size"] for c in clusters]
    return result
