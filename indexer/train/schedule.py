"""What a training step draws and how fast it moves: the noise levels σ and the learning rate.

Both are recipe choices that issue 26 decides by measured runs, so each is a named option kept in
the checkpoint's record. The paper's choices (SPEC §1) are the defaults: √σ uniform on [0, 1] and
Adam at 1e-3 halved every 100 epochs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SIGMA_DISTS = ("paper", "uniform", "focus", "wide")
LR_SCHEDULES = ("halve", "cosine", "linear")


def sample_sigmas(n: int, generator: torch.Generator, dist: str = "paper") -> torch.Tensor:
    """σ, one per image: in [0, 1], or [0, 5] for `wide`.

    paper:   √σ uniform, density ∝ σ^-1/2, small σ frequent (SPEC §1).
    uniform: flat, so large σ (where only global content helps) are drawn 3x as often (issue 9).
    focus:   a third each from `paper`, uniform on [0.1, 0.4] (where φ is read: σ 0.2) and
             uniform on [0.6, 1.0] (where guided sampling started: σ 1.0), issue 26.
    wide:    a quarter each of focus's three parts and log-uniform on [1, 5]: the default
             reconstruction schedule now starts at σ 5 (search/schedules.py), where a network
             trained on [0, 1] extrapolates.
    """
    if dist not in SIGMA_DISTS:
        raise ValueError(f'unknown sigma distribution "{dist}"; choose from {SIGMA_DISTS}')
    u = torch.rand(n, generator=generator)
    if dist == "paper":
        return u ** 2
    if dist == "uniform":
        return u
    part = torch.randint(0, 3 if dist == "focus" else 4, (n,), generator=generator)
    v = torch.rand(n, generator=generator)
    parts = torch.stack([u ** 2, 0.1 + 0.3 * v, 0.6 + 0.4 * v, 5.0 ** v])  # wide: + log-uniform
    return parts.gather(0, part[None]).squeeze(0)


@dataclass(frozen=True)
class LrSchedule:
    """The learning rate at a step. `start` is the step this schedule began at (a warm start or
    a resume keeps it, so the decay is over the planned run, not over the network's age).

    halve:  base * 0.5 ** floor(epoch / halve_every_epochs) (SPEC §1; 100 epochs: constant here).
    cosine: after `warmup` steps of linear warm-up, base * (1 + cos(π t / T)) / 2, t = steps
            since the warm-up ended, T = `steps` - `warmup`; 0 from then on.
    linear: the same warm-up, then base * (1 - t / T).
    """

    name: str = "halve"
    base: float = 1e-3
    warmup: int = 0                   # steps of linear warm-up from base / warmup
    steps: int | None = None          # cosine / linear: the planned run length, warm-up included
    start: int = 0                    # the step the schedule started at
    halve_every_epochs: float = 100.0

    def __post_init__(self) -> None:
        if self.name not in LR_SCHEDULES:
            raise ValueError(f'unknown lr schedule "{self.name}"; choose from {LR_SCHEDULES}')
        if self.name != "halve" and (self.steps is None or self.steps <= self.warmup):
            raise ValueError(f"the {self.name} schedule needs --schedule-steps greater than "
                             f"--warmup-steps ({self.steps} vs {self.warmup})")

    def __call__(self, step: int, epoch: float) -> float:
        k = step - self.start
        if self.warmup and k < self.warmup:
            return self.base * (k + 1) / self.warmup
        if self.name == "halve":
            return self.base * 0.5 ** math.floor(epoch / self.halve_every_epochs)
        t = min(k - self.warmup, self.steps - self.warmup) / (self.steps - self.warmup)
        if self.name == "cosine":
            return self.base * 0.5 * (1.0 + math.cos(math.pi * t))
        return self.base * (1.0 - t)


def downscale(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Training at a lower resolution (issue 26: 32x32 first buys 4x the images per step-second):
    2x2 area averages, as the data's own 64x64 images were made. (N, 3, H, W) -> (N, 3, r, r)."""
    if resolution == x.shape[-1]:
        return x
    if x.shape[-1] % resolution:
        raise ValueError(f"--resolution {resolution} must divide the images' {x.shape[-1]}")
    return torch.nn.functional.avg_pool2d(x, x.shape[-1] // resolution)
