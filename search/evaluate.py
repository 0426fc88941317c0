"""`idx eval`: how well a representation retrieves and clusters labelled images, beside baselines.

Every φ number stands next to the same metrics for raw pixels, 16x16 pixels and the same network
untrained, computed by this module from the same images (CONTRACT.md, `idx eval`). No index is
involved: vectors are computed here from the shards.

The metrics are in metrics.py, the Markdown table in eval_report.py.

Whitened readouts (`blocks+white64`) whose whitening is not stored in the checkpoint are fitted
here on the gallery's vectors (the training split); the output's settings say which.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from phisearch.indexer.model import checkpoint as ckpt
from phisearch.indexer.model.phi import features
from phisearch.indexer.model.readout import (
    READOUT_TAPS,
    Readout,
    Whitening,
    l2_normalize,
    parse_label,
)
from phisearch.indexer.sources.loader import first_samples, loader
from phisearch.indexer.sources.shards import expand, folder_info
from phisearch.search.metrics import score

Progress = Callable[[str, int, int], None]  # (stage, done, total)
# `idx eval --sweep`: φ at other (σ, draws) settings, one pass each (about 5 min each on the
# 13k-image held-out sets on one CPU); the default runs the baselines only.
SWEEP = tuple((s, d) for s in (0.1, 0.2, 0.4) for d in (1, 4))


@dataclass(frozen=True)
class EvalSettings:
    # φ settings of `phi`; None = the checkpoint's info["phi_defaults"], else CONTRACT's 0.2 / 4.
    sigma: float | None = None
    draws: int | None = None
    seed: int = 0
    # Extra (σ, draws) settings with the default readout, named phi_s{σ}_d{draws} (SWEEP).
    extra: tuple[tuple[float, int], ...] = ()
    # Readouts compared at the default (σ, draws), for the trained and the untrained network.
    readouts: tuple[str, ...] = ("mid", "blocks", "mid+white64", "blocks+white64",
                                 "blocks+white64+l2", "blocks+white128+l2")
    limit_queries: int | None = None
    limit_gallery: int | None = None
    # Balanced subsets (issue 26's protocols): N of each class, after skipping M of each.
    queries_per_class: int | None = None
    queries_skip_per_class: int = 0
    gallery_per_class: int | None = None
    # Fit every whitening on the gallery even where the checkpoint stores one (recipe runs:
    # every network judged the same way).
    refit_whitening: bool = False
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


def load_split(urls: Sequence[str] | str, limit: int | None = None,
               per_class: int | None = None, skip_per_class: int = 0
               ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The first `limit` labelled samples of the shards, in order: images (N, 64, 64, 3) uint8,
    labels (N,) int64, keys ("dataset/key", the identity of a point). Unlabelled samples are
    left out (they cannot be scored). With `per_class`: of each label, the samples numbered
    skip_per_class .. skip_per_class + per_class - 1 in shard order (a fixed, balanced subset;
    another skip gives a disjoint one, e.g. validation beside test)."""
    url_list = expand([urls] if isinstance(urls, str) else urls)
    if per_class is None:
        samples = first_samples(url_list, limit, labelled=True)
    else:
        samples = per_class_samples(url_list, per_class, skip_per_class)[:limit]
    return (np.stack([s.image for s in samples]), np.asarray([s.label for s in samples], np.int64),
            [f"{s.dataset}/{s.key}" for s in samples])


def per_class_samples(urls: list[str], per_class: int, skip: int = 0) -> list:
    """Samples skip..skip+per_class-1 of each label, in shard order. Reading stops once every
    class named by the shards' labels.tsv has its share (the shards are class-mixed)."""
    classes = len(folder_info(urls[0]).label_names) or None
    seen: dict[int, int] = {}
    out = []
    full = 0
    for batch in loader(urls, batch_size=256, workers=0):
        for s in batch.samples:
            if s.label is None:
                continue
            n = seen.get(s.label, 0)
            seen[s.label] = n + 1
            if skip <= n < skip + per_class:
                out.append(s)
                full += n == skip + per_class - 1
        if classes is not None and full >= classes:
            break
    if not out:
        raise ValueError(f"no labelled samples in {urls}")
    return out


def embed_images(model: torch.nn.Module, images: np.ndarray, sigma: float, draws: int, seed: int,
                 taps: Sequence[str], batch_size: int = 64,
                 progress: Callable[[int], None] | None = None, per_draw: bool = False,
                 poolings: dict | None = None) -> dict[str, np.ndarray]:
    """Spatial means of the taps (and the `poolings` of phi.features) for every image, in
    batches: {tap: (N, C) float32}, or (draws, N, C) with per_draw. `progress(n)` is called
    with the number of images of each batch."""
    taps = tuple(dict.fromkeys(taps))
    names = taps + tuple(poolings or ())
    parts: dict[str, list[np.ndarray]] = {t: [] for t in names}
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        got = features(model, chunk, sigma, draws, seed, taps, per_draw=per_draw,
                       poolings=poolings)
        for t in names:
            parts[t].append(got[t].numpy())
        if progress is not None:
            progress(len(chunk))
    # the image axis is the second to last either way
    return {t: np.concatenate(parts[t], axis=-2) if parts[t] else np.zeros((0, 0), np.float32)
            for t in names}


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


class _Run:
    """One `idx eval`: the images, both networks, their cached φ passes and every vector scored.
    Each method is one step of evaluate()."""

    def __init__(self, c: ckpt.Checkpoint, st: EvalSettings, label: str, query_urls,
                 gallery_urls, progress: Progress | None) -> None:
        self.st, self.label, self.progress = st, label, progress
        self.device = torch.device(st.device)
        self.seconds: dict[str, Any] = {"embed": {}, "score": {}}
        t = time.perf_counter()
        self.q_img, self.q_lab, q_keys = load_split(query_urls, st.limit_queries,
                                                    st.queries_per_class, st.queries_skip_per_class)
        self.g_img, self.g_lab, g_keys = load_split(gallery_urls, st.limit_gallery,
                                                    st.gallery_per_class)
        where = {key: i for i, key in enumerate(g_keys)}
        self.exclude = np.array([where.get(key, -1) for key in q_keys], np.int64)
        self.seconds["load"] = time.perf_counter() - t
        self.nq = len(self.q_img)
        self.all_img = np.concatenate([self.q_img, self.g_img])
        self.images_sha = images_digest(self.all_img)
        c.model.to(self.device).eval()
        u = ckpt.untrained(c.model.cfg, seed=st.random_init_seed, device=str(self.device))
        self.trained = _Net("phi", c.model, c.sha256)
        self.untrained = _Net("random_init", u.model, u.sha256)
        self.passes: dict[str, dict] = {}
        self.whitening_notes: dict[str, str] = {}
        self.small_gallery: dict[int, list[str]] = {}   # K -> representations with N <= K
        self.vectors: dict[str, tuple[np.ndarray, np.ndarray]] = {}   # rep -> (queries, gallery)

    def report(self, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)

    def cache_path(self, net: _Net, images_sha: str, sigma: float, draws: int) -> Path | None:
        st = self.st
        return Path(st.cache_dir) / cache_name(net.sha256, images_sha, sigma, draws, st.seed,
                                               self.device.type) if st.cache_dir else None

    def feats(self, net: _Net, sigma: float, draws: int, taps: Sequence[str]
              ) -> dict[str, np.ndarray]:
        """Spatial means of `taps` for every image at (σ, draws): from the cache, else a pass."""
        draws = 1 if sigma == 0 else draws
        key = (float(sigma), draws)
        if key in net.feats:
            return net.feats[key]
        st, stage, done = self.st, f"{net.name} σ={sigma:g} d={draws}", [0]

        def step(n: int) -> None:
            done[0] += n
            self.report(stage, done[0], len(self.all_img))

        # The queries and the gallery are cached apart, so a protocol that shares its gallery
        # with another (validation and test queries) embeds only its own queries. φ's noise is
        # seeded per image (CONTRACT.md), so the parts are the vectors of the whole.
        got, dt, cached = read_cache(self.cache_path(net, self.images_sha, sigma, draws), taps)
        if got is None:
            parts, dt, cached = [], 0.0, True
            for imgs in (self.q_img, self.g_img):
                path = self.cache_path(net, images_digest(imgs), sigma, draws)
                part, sec, hit = read_cache(path, taps)
                if part is None:
                    t0 = time.perf_counter()
                    part = embed_images(net.model, imgs, sigma, draws, st.seed, taps,
                                        st.batch_size, step)
                    sec = time.perf_counter() - t0
                    write_cache(path, part, sec)
                else:
                    step(len(imgs))
                parts.append(part)
                dt, cached = dt + sec, cached and hit
            got = {t: np.concatenate([parts[0][t], parts[1][t]], axis=-2) for t in taps}
        net.feats[key] = got
        name = f"{net.name}@{_rep_name(sigma, draws)[4:]}"
        self.seconds["embed"][name] = 0.0 if cached else dt
        self.passes[name] = {"sigma": float(sigma), "draws": draws, "images": len(self.all_img),
                             "seconds": round(dt, 3), "cached": cached,
                             "img_per_s": len(self.all_img) / dt if dt > 0 else None}
        return got

    def readout_vectors(self, rep: str, lab: str, f: dict[str, np.ndarray],
                        stored: dict | None) -> None:
        """Vectors of readout `lab`; a whitening from the checkpoint when it is stored there,
        else fitted on the gallery's vectors (as a collection built this way would be)."""
        spec = parse_label(lab)
        r = Readout(spec.name, sqrt=spec.sqrt)
        x = r.concat({t: torch.from_numpy(f[t]) for t in r.taps})
        if spec.white is not None:
            w = None
            if stored is not None and not self.st.refit_whitening:
                try:
                    w = Readout.from_checkpoint(lab, stored).whitening
                    self.whitening_notes[rep] = "stored in the checkpoint"
                except ValueError:
                    w = None
            if w is None:
                self.check_gallery(rep, spec.white)
                w = Whitening.fit(x[self.nq:], spec.white)
                self.whitening_notes[rep] = (f"fitted on the gallery vectors "
                                             f"(N={len(x) - self.nq}, K={w.proj.shape[1]})")
            x = w.apply(x)
        if spec.l2:
            x = l2_normalize(x)
        self.vectors[rep] = (x[:self.nq], x[self.nq:])

    def phi_vectors(self, c: ckpt.Checkpoint, taps: tuple[str, ...]) -> None:
        """φ and the untrained network with the chosen readout and the paper's readout raw;
        other (σ, draws) settings with a whitening fitted on their own gallery vectors (one
        fitted at the default setting misjudges them: σ = 0 scored 0.43 instead of 0.52)."""
        st = self.st
        for net, stored in ((self.trained, c.extras), (self.untrained, None)):
            f = self.feats(net, st.sigma, st.draws, taps)
            self.readout_vectors(net.name, self.label, f, stored)
            self.readout_vectors(f"{net.name}_mid_raw", "mid", f, None)
            for lab in st.readouts:
                if lab != "mid":
                    self.readout_vectors(f"{net.name}_{lab}", lab, f, stored)
        self.readout_vectors("phi_sigma0", self.label, self.feats(self.trained, 0.0, 1, taps),
                             None)
        for s, d in st.extra:
            rep = _rep_name(s, 1 if s == 0 else d)
            if rep not in self.vectors:
                self.readout_vectors(rep, self.label, self.feats(self.trained, s, d, taps), None)

    def pixel_vectors(self) -> None:
        nq = self.nq
        for rep, side in (("pixels", 64), ("pixels16", 16)):
            x = pixel_vectors(self.all_img, side)
            self.vectors[rep] = (x[:nq], x[nq:])
        x = pixel_vectors(self.all_img, 16)
        self.check_gallery("pixels16+white64", 64)
        w = Whitening.fit(x[nq:], 64)
        self.vectors["pixels16+white64"] = (w.apply(x[:nq]), w.apply(x[nq:]))
        self.whitening_notes["pixels16+white64"] = \
            f"fitted on the gallery vectors (N={len(x) - nq}, K=64)"

    def check_gallery(self, rep: str, k: int) -> None:
        """Note a whitening to K dims fitted on N <= K gallery vectors: the whitened gallery
        is then nearly equidistant and its scores say nothing."""
        if len(self.g_img) <= k:
            self.small_gallery.setdefault(k, []).append(rep)

    def warnings(self) -> list[str]:
        n = len(self.g_img)
        return [f"the gallery has {n} images, too few for a whitening to K={k} (N <= K): the "
                f"scores of {', '.join(reps)} are meaningless; use a gallery of well over {k} "
                "images (--gallery, --limit-gallery)"
                for k, reps in sorted(self.small_gallery.items())]

    def score_all(self) -> tuple[dict, dict]:
        reps: dict[str, dict[str, float]] = {}
        seps: dict[str, dict[str, float]] = {}
        st = self.st
        for i, (rep, (q, g)) in enumerate(self.vectors.items()):
            self.report("score", i, len(self.vectors))
            t0 = time.perf_counter()
            reps[rep], seps[rep] = score(q, self.q_lab, g, self.g_lab, self.exclude,
                                         st.kmeans_seed, st.kmeans_n_init, st.knn_k)
            self.seconds["score"][rep] = time.perf_counter() - t0
        self.report("score", len(self.vectors), len(self.vectors))
        return reps, seps

    def speeds(self) -> tuple[dict[str, float | None], list[str]]:
        """img/s of the φ pass behind each representation; which ones came from the cache
        (their speed is that of the run that filled it)."""
        st, img_per_s, cached = self.st, {}, []
        for rep in self.vectors:
            if rep.startswith("pixels"):
                continue
            net = "random_init" if rep.startswith("random_init") else "phi"
            if rep == "phi_sigma0":
                key = f"{net}@s0_d1"
            elif rep.startswith("phi_s"):
                key = f"{net}@{rep[4:]}"
            else:
                key = f"{net}@{_rep_name(st.sigma, 1 if st.sigma == 0 else st.draws)[4:]}"
            if key in self.passes:
                img_per_s[rep] = self.passes[key]["img_per_s"]
                if self.passes[key].get("cached"):
                    cached.append(rep)
        return img_per_s, cached


def read_cache(cache: Path | None, taps: Sequence[str]) -> tuple[dict | None, float, bool]:
    """(tap means, the seconds of the pass that made them, found) from a cache file."""
    if cache is None or not cache.is_file():
        return None, 0.0, False
    with np.load(cache) as z:
        if all(t in z.files for t in taps):
            return {t: z[t] for t in taps}, float(z["__seconds__"]), True
    return None, 0.0, False


def write_cache(cache: Path | None, got: dict, seconds: float) -> None:
    if cache is None:
        return
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, __seconds__=np.float64(seconds), **got)
    os.replace(tmp, cache)


def evaluate(checkpoint: str | ckpt.Checkpoint | None, query_urls: Sequence[str] | str,
             gallery_urls: Sequence[str] | str, readout_label: str | None = None,
             settings: EvalSettings = EvalSettings(), progress: Progress | None = None
             ) -> dict[str, Any]:
    """Retrieval and clustering metrics of φ and of its baselines; see the module docstring."""
    t_start = time.perf_counter()
    for lab in (readout_label or "mid", *settings.readouts):
        check_readout(lab)
    c = checkpoint if isinstance(checkpoint, ckpt.Checkpoint) else \
        ckpt.load(checkpoint, torch.device(settings.device))
    label = readout_label or c.info.get("readout") or "mid"
    defaults = c.info.get("phi_defaults") or {}
    st = replace(settings,
                 sigma=float(settings.sigma if settings.sigma is not None
                             else defaults.get("sigma", 0.2)),
                 draws=int(settings.draws if settings.draws is not None
                           else defaults.get("draws", 4)))
    labels = list(dict.fromkeys([label, "mid", *st.readouts]))
    taps = tuple(dict.fromkeys(t for lab in labels for t in READOUT_TAPS[parse_label(lab)[0]]))
    run = _Run(c, st, label, query_urls, gallery_urls, progress)
    run.phi_vectors(c, taps)
    run.pixel_vectors()
    reps, seps = run.score_all()
    run.seconds["total"] = time.perf_counter() - t_start
    img_per_s, cached_reps = run.speeds()
    s_dict = asdict(st)
    s_dict.update(
        readout=label, readout_taps=list(READOUT_TAPS[parse_label(label)[0]]),
        whitening=run.whitening_notes, passes=run.passes,
        queries={"urls": expand([query_urls] if isinstance(query_urls, str) else query_urls),
                 "count": run.nq, "classes": len(np.unique(run.q_lab))},
        gallery={"urls": expand([gallery_urls] if isinstance(gallery_urls, str) else gallery_urls),
                 "count": len(run.g_img), "classes": len(np.unique(run.g_lab))},
        excluded_self_matches=int((run.exclude >= 0).sum()),
        cached_representations=cached_reps,
        img_per_s_note="images per second of each φ pass on this machine (all taps of the pass)",
        torch_threads=torch.get_num_threads(),
    )
    return {
        "checkpoint": str(c.path) if c.path else c.name, "model_sha256": c.sha256,
        "readout": label, "representations": reps, "separation": seps,
        "img_per_s": img_per_s, "settings": s_dict, "warnings": run.warnings(),
        "seconds": {k: (round(v, 3) if isinstance(v, float) else
                        {kk: round(vv, 3) for kk, vv in v.items()})
                    for k, v in run.seconds.items()},
    }
