"""What a reconstruction shows, measured per sample, and how long a run will take.

A guided sample means something only beside two references: what the same sampler draws from
the same seed with no target (the unguided samples), and the indexed images it is near. For
each sample this module gives its nearest indexed images by the collection's own distance, the
majority label of its top 10 (bench/recon_fidelity.py's measure, per sample), and its φ error
relative to the target's distance from the index's mean φ:

    ||φ(x̂) − φ*|| / ||φ* − φ̄||     0 = exact, 1 = no closer than the mean of the index

(the error relative to ||φ*|| looks small for any image, because every φ shares a large common
part; this one does not).
"""

from __future__ import annotations

import functools
import math
import time
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from phisearch.indexer.model.embedder import Embedder
from phisearch.indexer.model.unet import UNet
from phisearch.indexer.store import Store
from phisearch.search.reconstruct import Schedule


@dataclass(frozen=True)
class Neighbour:
    """An indexed image near a sample: enough to show it without the store."""

    key: str | None
    label: str | None        # label_name, else the label number as text, else None
    distance: float
    thumb: str | None        # base64 JPEG (the payload's `thumb`)


@dataclass(frozen=True)
class SampleReport:
    image: np.ndarray              # (H, W, 3) uint8, the sample as shown
    centered_error: float          # ||φ(x̂) − φ*|| / ||φ* − φ̄||
    neighbours: list[Neighbour]    # the nearest few of the top k
    majority: str | None           # the most common label of the top k (None: unlabelled)
    majority_count: int            # how many of the top k carry it
    k: int


def centered_error(mid: np.ndarray, target: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """(N,) ||mid_i − target_i|| / ||target_i − mean||; target (C,) or (N, C). NaN where the
    target is the mean itself (no direction to measure against)."""
    mid = np.atleast_2d(np.asarray(mid, np.float64))
    target = np.broadcast_to(np.asarray(target, np.float64), mid.shape)
    spread = np.linalg.norm(target - np.asarray(mean, np.float64), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(spread > 0, np.linalg.norm(mid - target, axis=1) / spread, np.nan)


def label_of(payload: dict) -> str | None:
    name, label = payload.get("label_name"), payload.get("label")
    return name if name else (None if label is None else str(label))


def majority(labels: Sequence[Hashable]) -> tuple[Hashable, int]:
    """The most common label and its count; ties go to the label met first (nearest)."""
    counts = Counter(labels)
    best = max(counts.values())
    return next(lab for lab in labels if counts[lab] == best), best


def describe(store: Store, embedder: Embedder, samples: np.ndarray, target_mid: np.ndarray,
             mean_mid: np.ndarray, k: int = 10, show: int = 3) -> list[SampleReport]:
    """Each sample (N, H, W, 3) uint8 embedded with the collection's model and settings and
    searched in the collection: its top k (majority label) and the nearest `show` of them."""
    samples = np.asarray(samples, np.uint8)
    if not len(samples):
        return []
    dense, mid = embedder(samples)
    errors = centered_error(mid, target_mid, mean_mid)
    out = []
    for img, vec, err in zip(samples, dense, errors):
        hits = store.search(vec, limit=k)
        labels = [label_of(h.payload) for h in hits]
        top, count = majority(labels) if hits else (None, 0)
        near = [Neighbour(h.payload.get("key"), label_of(h.payload), float(h.distance),
                          h.payload.get("thumb")) for h in hits[:show]]
        out.append(SampleReport(img, float(err), near, top, count if top is not None else 0,
                                len(hits)))
    return out


def agreeing(reports: Sequence[SampleReport], label: str | None) -> int:
    """How many samples' top-k majority is `label` (the target's class)."""
    return sum(r.majority == label for r in reports) if label is not None else 0


# ----------------------------------------------------------------------------- time


@dataclass(frozen=True)
class PassTimes:
    """Seconds of one batched pass at the run's batch size, measured on this machine now."""

    guide: float      # encoder forward + backward (one guidance step)
    denoise: float    # the whole network, forward (one level)
    target: float     # φ of the target image at one σ (σ-matched mode)


@functools.lru_cache(maxsize=16)
def _probe(model: UNet, n: int, draws: int, threads: int, device: str) -> PassTimes:
    dev = torch.device(device)
    x = torch.rand(n, model.cfg.in_channels, 64, 64, device=dev)
    t_img = torch.rand(draws, model.cfg.in_channels, 64, 64, device=dev)

    def guide() -> None:
        y = x.clone().requires_grad_(True)
        mid, _ = model.encode(y)
        torch.autograd.grad(mid.mean(), y)

    def denoise() -> None:
        with torch.no_grad():
            model(x)

    def target() -> None:
        with torch.no_grad():
            model.encode(t_img)

    def best(fn) -> float:
        fn()                                  # warm-up
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    return PassTimes(best(guide), best(denoise), best(target))


def pass_times(model: UNet, n: int, draws: int) -> PassTimes:
    """Measured once per model, batch size and thread count (about a second on a CPU)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return _probe(model, n, draws, torch.get_num_threads(), str(device))
    finally:
        model.train(was_training)


def estimate_seconds(times: PassTimes, sch: Schedule, sigma_matched: bool,
                     unguided: bool) -> float:
    """The most a run can take: every level with every guidance step (samples that reach the
    tolerance stop earlier), the target's φ per level, and the unguided run (levels only).
    Algorithm B stops once its noise estimate reaches σ_L, usually long before `levels`."""
    per_level = times.denoise + sch.inner_steps * times.guide
    if sigma_matched:
        per_level += times.target
    total = sch.levels * per_level
    if unguided:
        total += sch.levels * times.denoise
    return total


def duration_text(seconds: float) -> str:
    """"12 s", "3 min", "1 h 10 min"."""
    if seconds < 90:
        return f"{max(1, math.ceil(seconds))} s"
    minutes = math.ceil(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60} min"


# ----------------------------------------------------------------------------- image statistics

# Radial frequency (cycles per pixel) above which high_freq_fraction counts energy: 1/16 is
# 4 cycles across a 64-pixel image, so blobs and colour washes fall below it and edges and
# texture above it.
HIGH_FREQ_CUTOFF = 1 / 16
FLAT_STD = 0.02               # pixel_std below this (about 5 of 255 levels) reads as a flat image


def pixel_std(images: np.ndarray) -> np.ndarray:
    """(N,) spatial contrast of (N, H, W, 3) uint8 images: each channel's standard deviation
    over the pixels, on the [0, 1] scale, averaged over channels. A flat colour gives 0; a real
    64x64 photo about 0.2."""
    x = np.asarray(images, np.float64) / 255.0
    return x.std(axis=(1, 2)).mean(axis=-1)


def high_freq_fraction(images: np.ndarray, cutoff: float = HIGH_FREQ_CUTOFF) -> np.ndarray:
    """(N,) the share of each image's spectral energy (luminance, mean removed, Hann-windowed so
    the image's borders add no false edges; the DC term left out) at radial frequencies above
    `cutoff` cycles per pixel. 0 for an image with no contrast at all; low for blobs, higher for
    photos, highest for pixel noise and checkerboards."""
    x = np.asarray(images, np.float64) / 255.0
    lum = x @ np.array([0.299, 0.587, 0.114])                       # (N, H, W)
    lum = lum - lum.mean(axis=(1, 2), keepdims=True)
    h, w = lum.shape[1:]
    power = np.abs(np.fft.fft2(lum * np.outer(np.hanning(h), np.hanning(w)))) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    radius = np.hypot(fy, fx)
    power[:, radius == 0] = 0.0
    total = power.sum(axis=(1, 2))
    high = power[:, radius > cutoff].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 1e-12 * h * w, high / total, 0.0)


def image_stats(images: np.ndarray) -> dict[str, float]:
    """Does a set of (N, H, W, 3) uint8 images look like photos? The means of pixel_std and
    high_freq_fraction, and the share of flat images (pixel_std < FLAT_STD); compare them with
    the same numbers for real images."""
    std = pixel_std(images)
    return {"pixel_std": round(float(std.mean()), 4),
            "high_freq_fraction": round(float(high_freq_fraction(images).mean()), 4),
            "flat_fraction": round(float((std < FLAT_STD).mean()), 4)}
