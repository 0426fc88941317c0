"""Sampling schedules for self-guided reconstruction (SPEC §4): what search/reconstruct.py's
two samplers take, and the named presets (`idx reconstruct --schedule`, the UI)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

# How algorithm A re-noises its estimate x for level k (σ_k) after level k-1 (σ_{k-1}, noisy y):
#   fresh:     y = x + σ_k z                            (SPEC §4, the authors': all new noise)
#   ancestral: y = x + √(σ_k² − s²) ε + s z, s² = σ_k² (1 − σ_k²/σ_{k-1}²), ε = (y − x)/σ_{k-1}
#   ddim:      y = x + σ_k ε                            (the same with s = 0: deterministic)
# With "fresh" every level starts again from the denoiser's average (x̂), so without guidance the
# samples converge to a smooth mean; "ancestral" keeps the noise the last level estimated, as a
# DDPM sampler does (DDIM's η = 1; Song et al. 2021), and draws an image even unguided.
RENOISE = ("fresh", "ancestral", "ddim")


@dataclass(frozen=True)
class Schedule:
    """How to sample. Algorithm A uses levels, sigma_max..sigma_min and spacing; B uses levels as
    its most iterations, sigma_max as the starting noise, sigma_min as σ_L, h0 and beta."""

    levels: int = 100            # A: noise levels; B: the most iterations
    inner_steps: int = 100       # guidance: most Adam steps per level (0 = no guidance)
    lr: float = 0.01             # guidance: Adam step size on the pixels
    sigma_max: float = 1.0       # A: first level; B: noise of the starting image
    sigma_min: float = 0.03      # A: last level; B: σ_L, stop once the noise estimate is below it
    tol: float = 0.01            # guidance: a sample stops at loss <= tol * its starting loss
    algorithm: str = "A"         # "A" fixed schedule | "B" adaptive
    spacing: str = "linear"      # A: "linear" (the authors') | "geometric" (more low-σ levels)
    draws: int = 10              # σ-matched mode: noisy copies of the target per φ*_k (authors: 10)
    h0: float = 0.01             # B: first step size (grows as h0 t / (1 + h0 (t - 1)))
    beta: float = 0.05           # B: 1 = no noise injected, 0 = all of it
    renoise: str = "fresh"       # A: "fresh" (the authors') | "ancestral" | "ddim", see RENOISE

    def __post_init__(self) -> None:
        if self.algorithm not in ("A", "B"):
            raise ValueError(f'unknown algorithm "{self.algorithm}"; use "A" or "B"')
        if self.renoise not in RENOISE:
            raise ValueError(f'unknown renoise "{self.renoise}"; use one of {", ".join(RENOISE)}')
        if self.spacing not in ("linear", "geometric"):
            raise ValueError(f'unknown spacing "{self.spacing}"; use "linear" or "geometric"')
        if self.levels < 1 or self.inner_steps < 0 or self.draws < 1:
            raise ValueError("levels and draws must be >= 1, inner_steps >= 0")
        if not 0 < self.sigma_min <= self.sigma_max:
            raise ValueError(f"need 0 < sigma_min <= sigma_max, got {self.sigma_min}, "
                             f"{self.sigma_max}")
        if self.lr <= 0 or self.tol < 0 or not 0 < self.h0 <= 1 or not 0 <= self.beta < 1:
            raise ValueError("need lr > 0, tol >= 0, 0 < h0 <= 1, 0 <= beta < 1")

    def sigmas(self) -> Tensor:
        """Algorithm A's noise levels, decreasing: (levels,) float32."""
        if self.levels == 1:
            return torch.tensor([self.sigma_min])
        if self.spacing == "geometric":
            return torch.logspace(math.log10(self.sigma_max), math.log10(self.sigma_min),
                                  self.levels)
        return torch.linspace(self.sigma_max, self.sigma_min, self.levels)


SCHEDULES: dict[str, Schedule] = {
    # The authors' ImageNet sampler: 100 linear levels 1.0 -> 0.03, up to 100 Adam steps each.
    "paper": Schedule(),
    # Chosen by measurement (bench/recon_speed.py -> bench/results/recon_speed.json; small64 at
    # 344 and 371 training steps, 8 samples, 2-core CPU shared with other jobs): about 10 s. The
    # cheapest row whose median error relative to the target's distance from the mean φ stayed
    # <= 0.15 with both checkpoints; few levels with a few steps each beat many short levels.
    # Re-noising ancestrally since bench/results/recon_schedules_small64_21919_renoise.json (30
    # imagenette targets x 4, shipped small64): guided samples among the target's class 0.192 vs
    # 0.150 with fresh noise, the same speed and φ error; the best fidelity per second.
    # Starting at σ 5 with 20 levels since recon_schedules_small64_45079_start*.json (30 targets
    # x 4, the 45,079-step model): from σ 1 the unguided samples stayed grey (pixel std 0.041,
    # real photos 0.207), because an image's coarsest components vary far more than σ 1 in an
    # orthonormal basis (a 64x64 image's mean colour: 0.14 x 64 = 9) and a sampler that starts
    # from the mean image at σ 1 cannot draw them. Of the rows whose unguided pixel std reached
    # half the photos', this one had the most guidance lift per second: guided 0.183-0.192 among
    # the target's class (σ 1, 10 levels: 0.167), unguided 0.100-0.125, pixel std 0.152, at
    # 1.3-1.4 s a sample (1.8x). The network never trained above σ 1; it extrapolates.
    "fast": Schedule(levels=20, inner_steps=3, lr=0.03, sigma_max=5.0, tol=0.05,
                     spacing="geometric", draws=4, renoise="ancestral"),
    # Algorithm B, the adaptive sampler, with the authors' step sizes.
    "adaptive": Schedule(algorithm="B", levels=1000, inner_steps=20, sigma_min=0.01, h0=0.01,
                         beta=0.05, draws=4),
}


def schedule(name: str = "fast", **overrides) -> Schedule:
    """A named preset, with any field replaced (None values are ignored)."""
    try:
        base = SCHEDULES[name]
    except KeyError:
        raise ValueError(f'unknown schedule "{name}"; choose from {sorted(SCHEDULES)}') from None
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
