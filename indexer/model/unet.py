"""The denoiser of SPEC §1: a blind, fully convolutional UNet that maps a noisy image to its clean
estimate. It is split once into `encode` (E1–E3 and the middle block M) and `decode`, so that
indexing never runs the decoder, which holds most of the FLOPs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from phisearch.indexer.model.config import UNetConfig
from torch import Tensor, nn

# Spatial means of each block's input and output, keyed "E1.in", "E1.out", ..., "D1.out".
Taps = dict[str, Tensor]


class StdNorm(nn.Module):
    """Divide by the per-image std over (C, H, W), scale per channel. No mean, no shift (SPEC §1),
    so the layer is homogeneous and behaves the same at every noise level."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        std = x.float().std(dim=(1, 2, 3), keepdim=True).to(x.dtype)  # (N, 1, 1, 1)
        return x / (std + self.eps) * self.scale.view(1, -1, 1, 1).to(x.dtype)


class Layer(nn.Sequential):
    """conv3x3 (+ StdNorm) + ReLU."""

    def __init__(self, cin: int, cout: int, norm: bool, bias: bool):
        mods: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=bias)]
        if norm:
            mods.append(StdNorm(cout))
        mods.append(nn.ReLU(inplace=True))
        super().__init__(*mods)


def stack(cin: int, cout: int, depth: int, bias: bool, first_norm: bool = True) -> nn.Sequential:
    """`depth` layers, the first from cin to cout, the rest at cout."""
    return nn.Sequential(*[
        Layer(cin if i == 0 else cout, cout, norm=first_norm or i > 0, bias=bias)
        for i in range(depth)
    ])


def _tap(taps: Taps | None, name: str, x: Tensor) -> None:
    if taps is not None:
        taps[name] = x.float().mean(dim=(-2, -1))  # (N, C)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        if len(cfg.widths) != 4 or len(cfg.enc_depth) != 3 or len(cfg.dec_depth) != 3:
            raise ValueError("UNetConfig needs 4 widths, 3 encoder and 3 decoder depths")
        self.cfg = cfg
        w1, w2, w3, wm = cfg.widths
        b = cfg.bias
        # E1's first conv has no norm: it sees the raw image (SPEC §1 table).
        self.enc = nn.ModuleList([
            stack(cfg.in_channels, w1, cfg.enc_depth[0], b, first_norm=False),  # E1 @ 64x64
            stack(w1, w2, cfg.enc_depth[1], b),                                  # E2 @ 32x32
            stack(w2, w3, cfg.enc_depth[2], b),                                  # E3 @ 16x16
        ])
        self.mid = stack(w3, wm, cfg.mid_depth, b)                                # M  @ 8x8
        # Decoder, deepest first: up-sample the block below, concat the skip, then convs.
        self.up = nn.ModuleList([
            nn.ConvTranspose2d(wm, w3, 2, stride=2, bias=b),  # M  -> D3
            nn.ConvTranspose2d(w3, w2, 2, stride=2, bias=b),  # D3 -> D2
            nn.ConvTranspose2d(w2, w1, 2, stride=2, bias=b),  # D2 -> D1
        ])
        self.dec = nn.ModuleList([
            stack(2 * w3, w3, cfg.dec_depth[2], b),  # D3
            stack(2 * w2, w2, cfg.dec_depth[1], b),  # D2
            stack(2 * w1, w1, cfg.dec_depth[0], b),  # D1
        ])
        self.out = nn.Conv2d(w1, cfg.in_channels, 3, padding=1, bias=b)  # linear output

    @property
    def mid_channels(self) -> int:
        return self.cfg.widths[3]

    def encode(self, y: Tensor, taps: Taps | None = None) -> tuple[Tensor, list[Tensor]]:
        """Down path and middle block. y: (N, C_in, H, W), H and W divisible by 8.
        Returns (a_M, skips); a_M is (N, C_M, H/8, W/8), after the last ReLU (so >= 0)."""
        if y.shape[-1] % 8 or y.shape[-2] % 8:
            raise ValueError(f"image sides must be divisible by 8, got {tuple(y.shape[-2:])}")
        skips = []
        x = y
        for i, block in enumerate(self.enc):
            _tap(taps, f"E{i + 1}.in", x)
            x = block(x)
            _tap(taps, f"E{i + 1}.out", x)
            skips.append(x)  # before pooling
            x = F.avg_pool2d(x, 2)
        _tap(taps, "M.in", x)
        x = self.mid(x)
        _tap(taps, "M.out", x)
        return x, skips

    def decode(self, mid: Tensor, skips: list[Tensor], taps: Taps | None = None) -> Tensor:
        """Up path. Returns the clean-image estimate x̂, (N, C_in, H, W)."""
        x = mid
        for level, (up, block) in enumerate(zip(self.up, self.dec)):
            name = f"D{3 - level}"
            x = torch.cat([up(x), skips[2 - level]], dim=1)
            _tap(taps, f"{name}.in", x)
            x = block(x)
            _tap(taps, f"{name}.out", x)
        return self.out(x)

    def forward(self, y: Tensor, taps: Taps | None = None) -> Tensor:
        return self.decode(*self.encode(y, taps), taps=taps)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
