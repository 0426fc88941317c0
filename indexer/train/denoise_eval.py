"""Denoising quality: PSNR of the noisy input, of the denoiser and of the best Gaussian blur
(the classical baseline) at a few noise levels, on fixed images with seeded noise."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from phisearch.indexer.model.phi import as_float
from phisearch.indexer.model.unet import UNet

EVAL_SIGMAS = (0.05, 0.1, 0.2, 0.4)


def psnr(x: torch.Tensor, ref: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """Per-image PSNR in dB for images in [0, 1] (estimates clamped to [0, 1]). (N,)"""
    x = x.float().clamp(0, 1) if clamp else x.float()
    mse = (x - ref.float()).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-12))


def gaussian_blur(x: torch.Tensor, width: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding: the classical baseline."""
    r = max(1, int(math.ceil(3 * width)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / width) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


BLUR_WIDTHS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.2, 1.4, 1.7, 2.0, 2.5, 3.0)


@torch.no_grad()
def denoise_eval(model: UNet, images: np.ndarray, sigmas=EVAL_SIGMAS, seed: int = 0,
                 batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Mean per-image PSNR (dB) of the noisy input, of x̂ and of the best Gaussian blur per σ."""
    model.eval()
    device = next(model.parameters()).device
    x = as_float(images)
    g = torch.Generator().manual_seed(seed)
    table = {}
    for s in sigmas:
        z = torch.randn(x.shape, generator=g)
        y = x + s * z
        den = torch.cat([model(y[i:i + batch_size].to(device)).float().cpu()
                         for i in range(0, len(y), batch_size)])
        blur = max(psnr(gaussian_blur(y, w), x).mean().item() for w in BLUR_WIDTHS)
        # the noisy input as the network sees it (unclamped: 20 dB at σ = 0.1)
        table[str(float(s))] = {"noisy": round(psnr(y, x, clamp=False).mean().item(), 3),
                                "denoised": round(psnr(den, x).mean().item(), 3),
                                "baseline": round(blur, 3)}
    return table
