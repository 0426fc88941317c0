"""The fastest way to run a training step on this host: dtype x memory format, measured.

Hosts differ (STACK.md): bf16 autocast is 1.6x or more fp32 on an AMX / AVX-512-bf16 host and
10x or worse *slower* on an AVX2-only one; channels_last helps some convolutions and not others.
So the choice is timed, never assumed: a few steps of each candidate on the run's own model and
batch size, and the winner is recorded in the run. A candidate whose first step is already 3x
slower than the best so far is dropped at once (bf16 on AVX2 would otherwise cost minutes).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from phisearch.indexer.model.unet import UNet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepMode:
    dtype: torch.dtype = torch.float32       # autocast dtype (fp32: no autocast)
    channels_last: bool = False

    @property
    def label(self) -> str:
        return f"{'bf16' if self.dtype == torch.bfloat16 else 'fp32'}" \
               f"{'+channels_last' if self.channels_last else ''}"

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.dtype,
                              enabled=self.dtype != torch.float32)

    def prepare(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        if not self.channels_last:
            return list(tensors)
        return [t.contiguous(memory_format=torch.channels_last) for t in tensors]


CANDIDATES = (StepMode(), StepMode(channels_last=True), StepMode(torch.bfloat16),
              StepMode(torch.bfloat16, channels_last=True))


def cpu_flags() -> set[str]:
    """The CPU's feature flags that matter here (empty where /proc/cpuinfo is unreadable)."""
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()
    return words & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


def time_step(model: UNet, mode: StepMode, batch_size: int, steps: int = 3,
              give_up_after: float = float("inf")) -> float:
    """Best seconds per training step (forward, backward, Adam) of a copy of `model`."""
    m = UNet(model.cfg)
    m.load_state_dict(model.state_dict())
    if mode.channels_last:
        m = m.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(m.parameters(), lr=0)
    x, = mode.prepare(torch.rand(batch_size, model.cfg.in_channels, 64, 64))
    best = float("inf")
    for _ in range(steps):
        t0 = time.perf_counter()
        with mode.autocast(torch.device("cpu")):
            loss = (m(x).float() - x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        best = min(best, time.perf_counter() - t0)
        if best > give_up_after:
            break
    return best


def probe(model: UNet, batch_size: int, candidates=CANDIDATES) -> tuple[StepMode, dict]:
    """Time each candidate; returns the fastest and {label: seconds per step} (None = dropped
    after its first step)."""
    times: dict[str, float | None] = {}
    best_mode, best = candidates[0], float("inf")
    for mode in candidates:
        t = time_step(model, mode, batch_size, give_up_after=3 * best)
        if t > 3 * best:
            times[mode.label] = None
            continue
        times[mode.label] = round(t, 4)
        if t < best:
            best_mode, best = mode, t
    log.info("training step probe (s/step): %s -> %s", times, best_mode.label)
    return best_mode, times


def mode_from(dtype: str, channels_last: bool | None = None) -> StepMode:
    """An explicit choice (--dtype fp32|bf16); channels_last defaults to off on CPU."""
    return StepMode(torch.bfloat16 if dtype == "bf16" else torch.float32, bool(channels_last))
