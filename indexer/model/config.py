"""Frozen configuration dataclasses shared by every layer: the network, φ and the store."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class UNetConfig:
    """The denoiser of SPEC §1. Widths are E1, E2, E3, M; the decoder mirrors E3, E2, E1."""

    in_channels: int = 3                          # 3 for RGB, 1 for grayscale
    widths: tuple[int, ...] = (64, 128, 256, 512)  # E1, E2, E3 and the middle block M
    enc_depth: tuple[int, ...] = (2, 2, 2)         # convs in E1, E2, E3
    mid_depth: int = 3                             # convs in M (its output is the φ layer)
    dec_depth: tuple[int, ...] = (5, 6, 7)         # convs in D1, D2, D3 (deep decoder)
    bias: bool = True                              # False = bias-free (Mohan et al. 2020)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown UNetConfig fields: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


PRESETS: dict[str, UNetConfig] = {
    # The paper's network: ≈13.7 M parameters.
    "paper64": UNetConfig(),
    # Half the width, same depths: ≈3.4 M parameters, trainable on a CPU.
    "small64": UNetConfig(widths=(32, 64, 128, 256)),
    # small64 with a shallow decoder (2/2/2 convs): the decoder is ~77% of small64's training
    # FLOPs, so this trains ~2x the images per CPU-minute (bench/arch_experiment.py).
    "small64-dec2": UNetConfig(widths=(32, 64, 128, 256), dec_depth=(2, 2, 2)),
    # For tests only: a few thousand parameters, same topology.
    "tiny": UNetConfig(widths=(8, 8, 16, 16), enc_depth=(1, 1, 1), mid_depth=2,
                       dec_depth=(1, 1, 1)),
}


def preset(name: str) -> UNetConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f'unknown preset "{name}"; choose from {sorted(PRESETS)}') from None


@dataclass(frozen=True)
class PhiConfig:
    """How φ is computed (SPEC §2, CONTRACT.md). A collection records these and refuses others."""

    sigma: float = 0.2     # noise level of the draws; 0 = one clean pass
    draws: int = 4         # noisy copies averaged per image (1 when sigma == 0)
    seed: int = 0          # with the image's pixels, seeds each image's noise
    readout: str = "mid"   # which network activations form the dense vector (see readout.py)

    def __post_init__(self) -> None:
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if self.draws < 1:
            raise ValueError(f"draws must be >= 1, got {self.draws}")

    @property
    def effective_draws(self) -> int:
        """Noise-free φ needs one pass, however many draws were asked for."""
        return 1 if self.sigma == 0 else self.draws
