"""φ(x; σ, n): spatial means of the middle block over n noisy copies of x (SPEC §2).

The noise for an image comes from a CPU generator seeded by `seed` and a hash of the image's
uint8 pixels, so identical pixels give identical φ in any batch, on any device, whether the
image was indexed or uploaded (CONTRACT.md). Draws are folded into the batch.
"""

from __future__ import annotations

import contextlib
import hashlib

import numpy as np
import torch
from torch import Tensor

from .unet import UNet

MID = "M.out"
MID_MAX = "M.out:max"    # spatial max of the middle block's channels
MID_2X2 = "M.out:2x2"    # means over the 2x2 quadrants (4 C values, quadrant-major per channel)


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


@torch.no_grad()
def features(model: UNet, images: np.ndarray | Tensor, sigma: float, draws: int, seed: int,
             taps: tuple[str, ...] = (MID,), amp_dtype: torch.dtype | None = None,
             per_draw: bool = False) -> dict[str, Tensor]:
    """Spatial means of the named block inputs/outputs ("E1.out", "M.out", ...), averaged over
    the draws. Returns {name: (N, C) float32 on the CPU}. Runs the decoder only if a tap needs it.
    per_draw: keep the draws apart, (draws, N, C). Draw j's noise does not depend on `draws`, so
    the mean of the first d of them is exactly φ with d draws (bench/draws_sweep.py)."""
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
    got: dict[str, Tensor] = {}
    with _autocast(device, amp_dtype):
        if any(t.startswith("D") for t in taps):
            model(y, taps=got)
        else:
            mid_map, _ = model.encode(y, taps=got)
            # Other poolings of the middle block (issue 9's pooling experiments).
            if MID_MAX in taps:
                got[MID_MAX] = mid_map.float().amax(dim=(-2, -1))
            if MID_2X2 in taps:
                got[MID_2X2] = torch.nn.functional.adaptive_avg_pool2d(mid_map.float(),
                                                                      2).flatten(1)
    missing = set(taps) - set(got)
    if missing:
        raise ValueError(f"unknown taps {sorted(missing)}; known: {sorted(got)}")
    split = {t: got[t].float().unflatten(0, (draws, n)) for t in taps}   # (draws, N, C)
    return {t: (v if per_draw else v.mean(0)).cpu() for t, v in split.items()}


def phi(model: UNet, images: np.ndarray | Tensor, sigma: float, draws: int, seed: int,
        amp_dtype: torch.dtype | None = None) -> Tensor:
    """The paper's φ: (N, C_M) float32, non-negative. images: (N, H, W, 3) uint8 or (N, 3, H, W)
    float in [0, 1]."""
    return features(model, images, sigma, draws, seed, (MID,), amp_dtype)[MID]
