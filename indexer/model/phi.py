"""φ(x; σ, n): spatial means of the middle block over n noisy copies of x (SPEC §2).

The noise for an image comes from a CPU generator seeded by `seed` and a hash of the image's
uint8 pixels, so identical pixels give identical φ in any batch, on any device, whether the
image was indexed or uploaded (CONTRACT.md). Draws are folded into the batch.

Numerics: a collection built on a GPU is searched with vectors made on a CPU (query, serve and
the UI default to cpu). CUDA runs fp32 convolutions in TF32 by default (10-bit mantissa), which
moves the shipped model's dense vectors by ~4e-4 of their largest component (a CPU emulation of
TF32's rounding); the φ pass therefore runs with TF32 (and oneDNN's bf16 for fp32) off
(`exact_fp32`), so a GPU and a CPU differ only by summation order. DEVICE_RTOL states the
agreement: for the same pixels and settings, on any device, batch or memory layout, the vectors
differ by at most DEVICE_RTOL * their largest |component| (tests/test_trust_answers.py checks it
on a CPU across layouts and batches, that the TF32 emulation exceeds it, and, marked gpu, CUDA
against CPU: not yet run on a GPU).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from phisearch.indexer.model.unet import UNet
from torch import Tensor

MID = "M.out"
Pooling = Callable[[Tensor], Tensor]   # the middle block's map (N, C, h, w) -> (N, D)
DEVICE_RTOL = 1e-4   # φ across devices, batches and layouts (module docstring)

# torch >= 2.9: per-backend, per-op fp32 precision ("ieee" | "tf32" | "bf16" | "none": inherit)
_PRECISION_OPS = (("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn"),
                  ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn"))
_exact = {"lock": threading.Lock(), "users": 0, "saved": None}


def _precision_ops() -> list:
    out = []
    for backend, op in _PRECISION_OPS:
        obj = getattr(getattr(torch.backends, backend, None), op, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            out.append(obj)
    return out


def precision_state() -> tuple:
    """The flags that decide whether fp32 convolutions and matmuls may run in lower precision
    (new per-op settings where this torch has them, else the legacy allow_tf32 flags)."""
    ops = _precision_ops()
    if ops:
        return tuple(o.fp32_precision for o in ops)
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())


def _set_precision(state: tuple | None) -> None:
    """Restore `state` (precision_state()), or with None make every fp32 op exact."""
    ops = _precision_ops()
    if ops:
        for o, v in zip(ops, state or ("ieee",) * len(ops)):
            o.fp32_precision = v
        return
    mm, conv, prec = state or (False, False, "highest")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = mm, conv
    torch.set_float32_matmul_precision(prec)


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 (and bf16-for-fp32) off while the block runs, the previous flags restored after.
    The flags are process-wide: nested and concurrent passes (serve's threads) share one
    setting, taken by the first to enter and restored by the last to leave."""
    with _exact["lock"]:
        if _exact["users"] == 0:
            _exact["saved"] = precision_state()
            _set_precision(None)
        _exact["users"] += 1
    try:
        yield
    finally:
        with _exact["lock"]:
            _exact["users"] -= 1
            if _exact["users"] == 0:
                _set_precision(_exact["saved"])


def as_uint8(images: np.ndarray | Tensor) -> np.ndarray:
    """(N, H, W, 3) uint8 from either uint8 NHWC arrays or float NCHW tensors in [0, 1]."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        return images
    t = images if isinstance(images, Tensor) else torch.from_numpy(np.asarray(images))
    t = (t.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return t.permute(0, 2, 3, 1).contiguous().numpy()


def as_float(images: np.ndarray | Tensor) -> Tensor:
    """(N, 3, H, W) float32 in [0, 1] on the CPU."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    t = images if isinstance(images, Tensor) else torch.from_numpy(np.asarray(images))
    return t.detach().float().cpu()


def noise_seed(pixels: np.ndarray, seed: int) -> int:
    """A 63-bit generator seed from the φ seed and one image's uint8 pixels."""
    h = hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=8,
                        key=int(seed).to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") >> 1


def noise(pixels: np.ndarray, draws: int, seed: int) -> Tensor:
    """(draws, N, 3, H, W) standard normal noise, each image's from its own generator."""
    n, h, w, c = pixels.shape
    out = torch.empty((draws, n, c, h, w))
    g = torch.Generator()
    for i in range(n):
        g.manual_seed(noise_seed(pixels[i], seed))
        out[:, i] = torch.randn((draws, c, h, w), generator=g)
    return out


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@functools.lru_cache(maxsize=16)
def _layout_probe(cfg_json: str, threads: int) -> bool:
    """True when channels_last runs the φ pass faster than NCHW for this network on this CPU
    (measured 1.47x on an AVX2 host, bench/results/train_speed.json; the vectors are the same)."""
    from phisearch.indexer.model.config import UNetConfig

    model = UNet(UNetConfig.from_dict(json.loads(cfg_json))).eval()
    x = torch.rand(32, model.cfg.in_channels, 64, 64)
    best = {}
    for cl in (False, True):
        m = model.to(memory_format=torch.channels_last) if cl else model
        y = x.contiguous(memory_format=torch.channels_last) if cl else x
        with torch.no_grad():
            m.encode(y)                                   # warm-up
            t0 = time.perf_counter()
            m.encode(y)
            best[cl] = time.perf_counter() - t0
    return best[True] < 0.9 * best[False]


def fast_layout(model: UNet) -> UNet:
    """The model in the memory format that runs the φ pass fastest here (CPU: measured once
    per network shape and thread count; CUDA: channels_last). Values do not change."""
    device = next(model.parameters()).device
    use = device.type == "cuda" or _layout_probe(model.cfg.to_json(), torch.get_num_threads())
    if use:
        model = model.to(memory_format=torch.channels_last)
    model.channels_last = use
    return model


@torch.no_grad()
def features(model: UNet, images: np.ndarray | Tensor, sigma: float, draws: int, seed: int,
             taps: tuple[str, ...] = (MID,), amp_dtype: torch.dtype | None = None,
             per_draw: bool = False, poolings: dict[str, Pooling] | None = None
             ) -> dict[str, Tensor]:
    """Spatial means of the named block inputs/outputs ("E1.out", "M.out", ...), averaged over
    the draws. Returns {name: (N, C) float32 on the CPU}. Runs the decoder only if a tap needs it.
    per_draw: keep the draws apart, (draws, N, C). Draw j's noise does not depend on `draws`, so
    the mean of the first d of them is exactly φ with d draws (bench/draws_sweep.py).
    poolings: other named reductions of the middle block's map (experiments), each averaged
    over the draws like a tap."""
    pixels = as_uint8(images)
    x = as_float(images)
    n = x.shape[0]
    draws = 1 if sigma == 0 else draws
    device = next(model.parameters()).device
    if n == 0:
        return {}
    y = x.unsqueeze(0)
    if sigma > 0:
        y = y + sigma * noise(pixels, draws, seed)                     # (draws, N, 3, H, W)
    y = y.reshape(draws * n, *x.shape[1:]).to(device, non_blocking=True)
    if getattr(model, "channels_last", False):   # set by fast_layout: match the model
        y = y.contiguous(memory_format=torch.channels_last)
    got: dict[str, Tensor] = {}
    with exact_fp32(), _autocast(device, amp_dtype):
        mid_map, skips = model.encode(y, taps=got)
        if any(t.startswith("D") for t in taps):
            model.decode(mid_map, skips, taps=got)
        for name, pool in (poolings or {}).items():
            got[name] = pool(mid_map.float())
    missing = set(taps) - set(got)
    if missing:
        raise ValueError(f"unknown taps {sorted(missing)}; known: {sorted(got)}")
    names = tuple(taps) + tuple(poolings or ())
    split = {t: got[t].float().unflatten(0, (draws, n)) for t in names}   # (draws, N, C)
    return {t: (v if per_draw else v.mean(0)).cpu() for t, v in split.items()}


def participation_ratio(v: np.ndarray | Tensor, axis: int = -1, dead: float = np.nan
                        ) -> np.ndarray:
    """(Σ|v|)² / (C Σv²) along `axis`, C the length of that axis: in [1/C, 1], 1 when every
    entry is equal, about k/C when k entries are equal and the rest zero (SPEC §3). An all-zero
    vector (a dead channel) gets `dead`: NaN to leave it out of averages, 0 to rank it last.
    Signed vectors (the image, the transposed-conv half of decoder inputs) count by |v|."""
    v = np.abs(np.asarray(v, np.float64))
    s1, s2 = v.sum(axis), (v * v).sum(axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s2 > 0, s1 * s1 / (v.shape[axis] * s2), dead)


def phi(model: UNet, images: np.ndarray | Tensor, sigma: float, draws: int, seed: int,
        amp_dtype: torch.dtype | None = None) -> Tensor:
    """The paper's φ: (N, C_M) float32, non-negative. images: (N, H, W, 3) uint8 or (N, 3, H, W)
    float in [0, 1]."""
    return features(model, images, sigma, draws, seed, (MID,), amp_dtype)[MID]
