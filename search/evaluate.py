"""`idx eval`: how well a representation retrieves and clusters labelled images, beside baselines.

Every φ number stands next to the same metrics for raw pixels, 16x16 pixels and the same network
untrained, computed by this module from the same images (CONTRACT.md, `idx eval`). No index is
involved: vectors are computed here from the shards.

Metrics (Euclidean distance throughout):
- retrieval of each query against the gallery: `knn@1`, `knn@10` (majority vote of the 10
  nearest, ties go to the tied label met first), `p@10` (fraction of the 10 nearest sharing the
  query's label), `map` (mean average precision over the whole gallery ranking). A gallery item
  with the query's own key (the same image) is left out of that query's ranking.
- clustering of the query set: k-means with k = number of classes -> `nmi`, `ari`, `purity`.
- separation Δ/s (SPEC §3) of pairs of groups: Δ = distance between the two centroids,
  s = pooled within-group std of the points projected on the unit vector joining them; the
  median over all class pairs and over all k-means cluster pairs.

Whitened readouts (`blocks+white64`) whose whitening is not stored in the checkpoint are fitted
here on the gallery's vectors (the training split); the output's settings say which.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from phisearch.indexer import checkpoint as ckpt
from phisearch.indexer.phi import features
from phisearch.indexer.readout import READOUT_TAPS, Readout, Whitening, l2_normalize, parse_label
from phisearch.indexer.shards import expand, loader

METRICS = ("knn@1", "knn@10", "p@10", "map", "nmi", "ari", "purity")
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class EvalSettings:
    # φ settings of `phi`; None = the checkpoint's info["phi_defaults"], else CONTRACT's 0.2 / 4.
    sigma: float | None = None
    draws: int | None = None
    seed: int = 0
    # Extra (σ, draws) settings with the default readout, named phi_s{σ}_d{draws}.
    extra: tuple[tuple[float, int], ...] = tuple(
        (s, d) for s in (0.1, 0.2, 0.4) for d in (1, 4))
    # Readouts compared at the default (σ, draws), for the trained and the untrained network.
    readouts: tuple[str, ...] = ("mid", "blocks", "mid+white64", "blocks+white64",
                                 "blocks+white64+l2", "blocks+white128+l2")
    limit_queries: int | None = None
    limit_gallery: int | None = None
    batch_size: int = 64
    device: str = "cpu"
    kmeans_seed: int = 0
    kmeans_n_init: int = 4
    random_init_seed: int = 0
    knn_k: int = 10
    # Keep each pass's vectors here (keyed by model sha256, images, σ, draws, seed, device) and
    # reuse them: the untrained and unchanged networks need not be embedded again.
    cache_dir: str | None = None


# --------------------------------------------------------------------------------------------
# Data and vectors


def load_split(urls: Sequence[str] | str, limit: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The first `limit` labelled samples of the shards, in order: images (N, 64, 64, 3) uint8,
    labels (N,) int64, keys ("dataset/key", the identity of a point). Unlabelled samples are
    left out (they cannot be scored)."""
    urls = expand([urls] if isinstance(urls, str) else urls)
    imgs: list[np.ndarray] = []
    labels: list[int] = []
    keys: list[str] = []
    for batch in loader(urls, batch_size=256, workers=0):
        for s in batch.samples:
            if s.label is None:
                continue
            imgs.append(s.image)
            labels.append(s.label)
            keys.append(f"{s.dataset}/{s.key}")
            if limit is not None and len(imgs) >= limit:
                break
        if limit is not None and len(imgs) >= limit:
            break
    if not imgs:
        raise ValueError(f"no labelled samples in {urls}")
    return np.stack(imgs), np.asarray(labels, np.int64), keys


def embed_images(model: torch.nn.Module, images: np.ndarray, sigma: float, draws: int, seed: int,
                 taps: Sequence[str], batch_size: int = 64,
                 progress: Callable[[int], None] | None = None, per_draw: bool = False
                 ) -> dict[str, np.ndarray]:
    """Spatial means of the taps for every image, via `phi.features` in batches:
    {tap: (N, C) float32}, or (draws, N, C) with per_draw. `progress(n)` is called with the
    number of images of each batch."""
    taps = tuple(dict.fromkeys(taps))
    parts: dict[str, list[np.ndarray]] = {t: [] for t in taps}
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        got = features(model, chunk, sigma, draws, seed, taps, per_draw=per_draw)
        for t in taps:
            parts[t].append(got[t].numpy())
        if progress is not None:
            progress(len(chunk))
    # the image axis is the second to last either way
    return {t: np.concatenate(parts[t], axis=-2) if parts[t] else np.zeros((0, 0), np.float32)
            for t in taps}


def images_digest(images: np.ndarray) -> str:
    """Identity of an image set for the vector cache (order matters)."""
    return hashlib.blake2b(np.ascontiguousarray(images).tobytes(), digest_size=8).hexdigest()


def cache_name(model_sha256: str, images_sha: str, sigma: float, draws: int, seed: int,
               device: str) -> str:
    """File name of one φ pass's cached tap means (`idx eval --cache`, bench scripts)."""
    return f"{model_sha256[:16]}_{images_sha}_s{float(sigma):g}_d{draws}_seed{seed}_{device}.npz"


def pixel_vectors(images: np.ndarray, side: int = 64) -> np.ndarray:
    """Flattened pixels in [0, 1]; side < 64 = area (average-pool) downsample first."""
    x = images.astype(np.float32) / 255.0
    f = images.shape[1] // side
    if f > 1:
        n, h, w, c = x.shape
        x = x.reshape(n, h // f, f, w // f, f, c).mean(axis=(2, 4))
    return x.reshape(len(x), -1)


# --------------------------------------------------------------------------------------------
# Metrics


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


# --------------------------------------------------------------------------------------------
# The evaluation


@dataclass
class _Net:
    """One network's vectors per (σ, draws): {tap: (Nq+Ng, C)}."""

    name: str
    model: torch.nn.Module
    sha256: str
    feats: dict[tuple[float, int], dict[str, np.ndarray]] = field(default_factory=dict)


def check_readout(label: str) -> str:
    """A readout label: NAME[+sqrt][+whiteK][+l2] (NAME in READOUT_TAPS); ValueError if not."""
    parse_label(label)
    return label


def _rep_name(sigma: float, draws: int) -> str:
    return f"phi_s{float(sigma):g}_d{draws}"


def evaluate(checkpoint: str | ckpt.Checkpoint | None, query_urls: Sequence[str] | str,
             gallery_urls: Sequence[str] | str, readout_label: str | None = None,
             settings: EvalSettings = EvalSettings(), progress: Progress | None = None
             ) -> dict[str, Any]:
    """Retrieval and clustering metrics of φ and of its baselines; see the module docstring."""
    t_start = time.perf_counter()
    seconds: dict[str, Any] = {"embed": {}, "score": {}}
    st = settings
    device = torch.device(st.device)

    def report(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(stage, done, total)

    for lab in (readout_label or "mid", *st.readouts):
        check_readout(lab)

    # Data.
    t = time.perf_counter()
    q_img, q_lab, q_keys = load_split(query_urls, st.limit_queries)
    g_img, g_lab, g_keys = load_split(gallery_urls, st.limit_gallery)
    where = {key: i for i, key in enumerate(g_keys)}
    exclude = np.array([where.get(key, -1) for key in q_keys], np.int64)
    seconds["load"] = time.perf_counter() - t
    nq = len(q_img)
    all_img = np.concatenate([q_img, g_img])

    # Networks.
    c = checkpoint if isinstance(checkpoint, ckpt.Checkpoint) else ckpt.load(checkpoint, device)
    c.model.to(device).eval()
    u = ckpt.untrained(c.model.cfg, seed=st.random_init_seed, device=str(device))
    trained, untrained = _Net("phi", c.model, c.sha256), _Net("random_init", u.model, u.sha256)
    images_sha = images_digest(all_img)

    label = readout_label or c.info.get("readout") or "mid"
    defaults = c.info.get("phi_defaults") or {}
    st = replace(st, sigma=float(st.sigma if st.sigma is not None else defaults.get("sigma", 0.2)),
                 draws=int(st.draws if st.draws is not None else defaults.get("draws", 4)))
    labels = list(dict.fromkeys([label, "mid", *st.readouts]))
    taps = tuple(dict.fromkeys(t for lab in labels for t in READOUT_TAPS[parse_label(lab)[0]]))
    default_taps = READOUT_TAPS[parse_label(label)[0]]

    passes: dict[str, dict] = {}

    def feats(net: _Net, sigma: float, draws: int, taps_needed: Sequence[str]
              ) -> dict[str, np.ndarray]:
        draws = 1 if sigma == 0 else draws
        key = (float(sigma), draws)
        if key not in net.feats:
            stage = f"{net.name} σ={sigma:g} d={draws}"
            done = [0]

            def step(n: int) -> None:
                done[0] += n
                report(stage, done[0], len(all_img))

            cache = None
            if st.cache_dir:
                cache = Path(st.cache_dir) / cache_name(net.sha256, images_sha, sigma, draws,
                                                        st.seed, device.type)
            got = None
            if cache is not None and cache.is_file():
                with np.load(cache) as z:
                    if all(t in z.files for t in taps_needed):
                        got = {t: z[t] for t in taps_needed}
                        dt = float(z["__seconds__"])
            cached = got is not None
            if got is None:
                t0 = time.perf_counter()
                got = embed_images(net.model, all_img, sigma, draws, st.seed, taps_needed,
                                   st.batch_size, step)
                dt = time.perf_counter() - t0
                if cache is not None:
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    tmp = cache.with_suffix(".tmp.npz")
                    np.savez(tmp, __seconds__=np.float64(dt), **got)
                    os.replace(tmp, cache)
            net.feats[key] = got
            name = f"{net.name}@{_rep_name(sigma, draws)[4:]}"
            seconds["embed"][name] = 0.0 if cached else dt
            passes[name] = {"sigma": float(sigma), "draws": draws, "images": len(all_img),
                            "seconds": round(dt, 3), "cached": cached,
                            "img_per_s": len(all_img) / dt if dt > 0 else None}
        return net.feats[key]

    whitening_notes: dict[str, str] = {}
    vectors: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # rep -> (queries, gallery)

    def readout_vectors(rep: str, net: _Net, lab: str, f: dict[str, np.ndarray],
                        stored: dict | None) -> None:
        spec = parse_label(lab)
        k = spec.white
        r = Readout(spec.name, sqrt=spec.sqrt)
        x = r.concat({t: torch.from_numpy(f[t]) for t in r.taps})
        if k is not None:
            w = None
            if stored is not None:
                try:
                    w = Readout.from_checkpoint(lab, stored).whitening
                    whitening_notes[rep] = "stored in the checkpoint"
                except ValueError:
                    w = None
            if w is None:
                w = Whitening.fit(x[nq:], k)
                whitening_notes[rep] = (f"fitted on the gallery vectors (N={len(x) - nq}, "
                                        f"K={w.proj.shape[1]})")
            x = w.apply(x)
        if spec.l2:
            x = l2_normalize(x)
        vectors[rep] = (x[:nq], x[nq:])

    # φ and the untrained network with the chosen readout; the paper's readout, raw.
    for net, stored in ((trained, c.extras), (untrained, None)):
        f = feats(net, st.sigma, st.draws, taps)
        readout_vectors(net.name, net, label, f, stored)
        readout_vectors(f"{net.name}_mid_raw", net, "mid", f, None)
        for lab in st.readouts:
            if lab != "mid":
                readout_vectors(f"{net.name}_{lab}", net, lab, f, stored)
    # Other (σ, draws) settings: a whitening is fitted on their own gallery vectors, as a
    # collection built at that setting would be; one fitted at the default setting misjudges them
    # (σ = 0 scored 0.43 instead of 0.52 that way, bench/draws_sweep.py).
    readout_vectors("phi_sigma0", trained, label, feats(trained, 0.0, 1, taps), None)
    for s, d in st.extra:
        rep = _rep_name(s, 1 if s == 0 else d)
        if rep not in vectors:
            readout_vectors(rep, trained, label, feats(trained, s, d, taps), None)

    # Pixel baselines.
    for rep, side in (("pixels", 64), ("pixels16", 16)):
        x = pixel_vectors(all_img, side)
        vectors[rep] = (x[:nq], x[nq:])
    x = pixel_vectors(all_img, 16)
    w = Whitening.fit(x[nq:], 64)
    vectors["pixels16+white64"] = (w.apply(x[:nq]), w.apply(x[nq:]))
    whitening_notes["pixels16+white64"] = f"fitted on the gallery vectors (N={len(x) - nq}, K=64)"

    # Scores.
    reps: dict[str, dict[str, float]] = {}
    seps: dict[str, dict[str, float]] = {}
    for i, (rep, (q, g)) in enumerate(vectors.items()):
        report("score", i, len(vectors))
        t0 = time.perf_counter()
        reps[rep], seps[rep] = score(q, q_lab, g, g_lab, exclude, st.kmeans_seed,
                                     st.kmeans_n_init, st.knn_k)
        seconds["score"][rep] = time.perf_counter() - t0
    report("score", len(vectors), len(vectors))
    seconds["total"] = time.perf_counter() - t_start

    img_per_s = {}
    cached_reps: list[str] = []  # vectors read from the cache: their speed is from that run
    for rep in vectors:
        if rep.startswith(("pixels",)):
            continue
        net = "random_init" if rep.startswith("random_init") else "phi"
        if rep == "phi_sigma0":
            key = f"{net}@s0_d1"
        elif rep.startswith("phi_s"):
            key = f"{net}@{rep[4:]}"
        else:
            key = f"{net}@{_rep_name(st.sigma, 1 if st.sigma == 0 else st.draws)[4:]}"
        if key in passes:
            img_per_s[rep] = passes[key]["img_per_s"]
            if passes[key].get("cached"):
                cached_reps.append(rep)

    s_dict = asdict(st)
    s_dict.update(
        readout=label, readout_taps=list(default_taps),
        whitening=whitening_notes, passes=passes,
        queries={"urls": expand([query_urls] if isinstance(query_urls, str) else query_urls),
                 "count": nq, "classes": len(np.unique(q_lab))},
        gallery={"urls": expand([gallery_urls] if isinstance(gallery_urls, str) else gallery_urls),
                 "count": len(g_img), "classes": len(np.unique(g_lab))},
        excluded_self_matches=int((exclude >= 0).sum()),
        cached_representations=cached_reps,
        img_per_s_note="images per second of each φ pass on this machine (all taps of the pass)",
        torch_threads=torch.get_num_threads(),
    )
    return {
        "checkpoint": str(c.path) if c.path else c.name,
        "model_sha256": c.sha256,
        "readout": label,
        "representations": reps,
        "separation": seps,
        "img_per_s": img_per_s,
        "settings": s_dict,
        "seconds": {k: (round(v, 3) if isinstance(v, float) else
                        {kk: round(vv, 3) for kk, vv in v.items()})
                    for k, v in seconds.items()},
    }


# --------------------------------------------------------------------------------------------
# Presentation


def _order(reps: Sequence[str]) -> list[str]:
    first = ["phi", "phi_mid_raw", "phi_sigma0"]
    groups = [
        [r for r in first if r in reps],
        sorted(r for r in reps if r.startswith("phi_") and r not in first
               and not r.startswith("phi_s")),
        [r for r in ("random_init", "random_init_mid_raw") if r in reps],
        sorted(r for r in reps if r.startswith("random_init_") and r != "random_init_mid_raw"),
        [r for r in ("pixels", "pixels16", "pixels16+white64") if r in reps],
        [r for r in reps if r.startswith("phi_s") and r != "phi_sigma0"],
    ]
    seen = [r for gr in groups for r in gr]
    return seen + [r for r in reps if r not in seen]


def markdown(result: dict[str, Any]) -> str:
    """The result as a markdown table (one row per representation)."""
    s = result["settings"]
    cached = set(s.get("cached_representations", ()))
    q_files = ", ".join(u.rsplit("/", 1)[-1] for u in s["queries"]["urls"])
    g_files = ", ".join(u.rsplit("/", 1)[-1] for u in s["gallery"]["urls"])
    lines = [f"# idx eval: `{result['checkpoint']}`", ""]
    lines.append(f"- model sha256 `{result['model_sha256'][:16]}…`; readout of `phi`: "
                 f"`{result['readout']}`; φ σ={s['sigma']:g}, draws={s['draws']}, "
                 f"seed={s['seed']}")
    lines.append(f"- queries: {s['queries']['count']} images, {s['queries']['classes']} classes "
                 f"({q_files}); gallery: {s['gallery']['count']} images ({g_files}); "
                 f"self-matches left out: {s['excluded_self_matches']}")
    for rep, note in s["whitening"].items():
        lines.append(f"- whitening of `{rep}`: {note}")
    lines.append(f"- total {result['seconds']['total']:.0f} s; img/s = φ pass speed on this "
                 f"machine ({s['device']}, {s['torch_threads']} torch threads)")
    header = ("| representation | knn@1 | knn@10 | p@10 | mAP | NMI | ARI | purity "
              "| Δ/s classes | Δ/s clusters | img/s |")
    if cached:
        lines.append("- img/s marked * : vectors read from --cache; the speed is from the run "
                     "that computed them")
    lines += ["", header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    reps, seps, ips = result["representations"], result["separation"], result["img_per_s"]
    for rep in _order(list(reps)):
        m, sp = reps[rep], seps[rep]
        speed = f"{ips[rep]:.0f}" if ips.get(rep) else "–"
        if rep in cached:
            speed += "*"
        lines.append(f"| `{rep}` | " + " | ".join(f"{m[k]:.3f}" for k in METRICS)
                     + f" | {sp['classes']:.2f} | {sp['clusters']:.2f} | {speed} |")
    return "\n".join(lines) + "\n"
