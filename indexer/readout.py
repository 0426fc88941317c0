"""Readouts: which network activations form a collection's dense `phi` vector.

`mid` is the paper's φ (middle-block channel means, SPEC §2). `blocks` concatenates the means of
every encoder block's output and the middle block's. Either may be whitened: PCA to K dims with
unit variance per dim, fitted on training-set vectors and stored with the checkpoint, so that
Euclidean distance weighs every direction of variation alike. The sparse `phi_sparse` vector is
always the middle block's non-zero channels, whatever the readout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .phi import MID

READOUT_TAPS: dict[str, tuple[str, ...]] = {
    "mid": (MID,),
    "blocks": ("E1.out", "E2.out", "E3.out", MID),
}


@dataclass(frozen=True)
class Whitening:
    """x -> (x - mean) @ proj, proj = V_k / sqrt(λ_k): PCA to K dims, unit variance."""

    mean: np.ndarray   # (D,)
    proj: np.ndarray   # (D, K)

    @classmethod
    def fit(cls, x: np.ndarray, k: int, eps: float = 1e-6) -> Whitening:
        x = np.asarray(x, np.float64)
        mean = x.mean(0)
        # SVD of the centred data: right singular vectors are the principal axes.
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        k = min(k, vt.shape[0])
        var = s[:k] ** 2 / max(len(x) - 1, 1)
        # Fix each axis' sign so that the fit is deterministic across LAPACK builds.
        signs = np.sign(vt[:k, np.argmax(np.abs(vt[:k]), axis=1)].diagonal())
        signs[signs == 0] = 1
        proj = (vt[:k] * signs[:, None]).T / np.sqrt(var + eps)
        return cls(mean.astype(np.float32), proj.astype(np.float32))

    def apply(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float32) - self.mean) @ self.proj).astype(np.float32)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for a in (self.mean, self.proj):
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a, np.float32).tobytes())
        return h.hexdigest()

    def to_tensors(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}.mean": torch.from_numpy(self.mean.copy()),
                f"{prefix}.proj": torch.from_numpy(self.proj.copy())}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], prefix: str) -> Whitening | None:
        if f"{prefix}.mean" not in tensors:
            return None
        return cls(tensors[f"{prefix}.mean"].float().numpy(), tensors[f"{prefix}.proj"].float().numpy())


@dataclass(frozen=True)
class Readout:
    """A named readout: optionally square-rooted (`+sqrt`, power normalization of the
    non-negative means: large activations weigh less), whitened (`+whiteK`), L2-normalized after
    that (`+l2`: Euclidean distance between unit vectors orders neighbours as the cosine does)."""

    name: str = "mid"
    whitening: Whitening | None = None
    l2: bool = False
    sqrt: bool = False

    def __post_init__(self) -> None:
        if self.name not in READOUT_TAPS:
            raise ValueError(f'unknown readout "{self.name}"; choose from {sorted(READOUT_TAPS)}')

    @property
    def taps(self) -> tuple[str, ...]:
        return READOUT_TAPS[self.name]

    @property
    def label(self) -> str:
        """e.g. 'mid', 'blocks+white64' or 'blocks+sqrt+white64+l2': what a collection records."""
        label = self.name + ("+sqrt" if self.sqrt else "")
        if self.whitening is not None:
            label += f"+white{self.whitening.proj.shape[1]}"
        return label + ("+l2" if self.l2 else "")

    def sha256(self) -> str:
        h = hashlib.sha256(self.label.encode())
        if self.whitening is not None:
            h.update(self.whitening.sha256().encode())
        return h.hexdigest()

    def concat(self, feats: dict[str, Tensor]) -> np.ndarray:
        """The readout before whitening: (N, D) float32."""
        x = torch.cat([feats[t].float() for t in self.taps], dim=1)
        return (x.clamp_min(0).sqrt() if self.sqrt else x).numpy()

    def vectors(self, feats: dict[str, Tensor]) -> np.ndarray:
        """The dense vectors of a batch: (N, D or K) float32."""
        x = self.concat(feats)
        x = self.whitening.apply(x) if self.whitening is not None else x
        return l2_normalize(x) if self.l2 else x

    @classmethod
    def from_checkpoint(cls, label: str, extras: dict[str, Tensor]) -> Readout:
        """Resolve a readout label ('mid', 'blocks+white64+l2') against a checkpoint's extras."""
        spec = parse_label(label)
        if spec.white is None:
            return cls(spec.name, None, spec.l2, spec.sqrt)
        w = Whitening.from_tensors(extras, f"readout.{spec.whitening_key}")
        if w is None:
            raise ValueError(f'readout "{label}" needs a whitening fitted with the checkpoint; '
                             f"this checkpoint has {sorted(extras) or 'none'}")
        return cls(spec.name, w, spec.l2, spec.sqrt)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


class ReadoutSpec(NamedTuple):
    name: str
    white: int | None      # K of +whiteK
    l2: bool
    sqrt: bool

    @property
    def whitening_key(self) -> str:
        """Where the whitening lives in a checkpoint's extras (shared by the +l2 variant)."""
        return f"{self.name}{'+sqrt' if self.sqrt else ''}+white{self.white}"


def parse_label(label: str) -> ReadoutSpec:
    """'blocks+sqrt+white128+l2' -> ReadoutSpec('blocks', 128, True, True); modifiers in that
    order, each at most once. ValueError for anything else."""
    name, *mods = label.split("+")
    order = ["sqrt", "white", "l2"]
    k, l2, sqrt, last = None, False, False, -1
    for m in mods:
        kind = "white" if m.startswith("white") else m
        pos = order.index(kind) if kind in order else -1
        if pos <= last:
            name = ""
            break
        last = pos
        if kind == "white":
            if not (m[5:].isdigit() and int(m[5:]) >= 1):
                name = ""
                break
            k = int(m[5:])
        l2, sqrt = l2 or kind == "l2", sqrt or kind == "sqrt"
    if name not in READOUT_TAPS:
        raise ValueError(f'bad readout "{label}": use NAME[+sqrt][+whiteK][+l2] with NAME in '
                         f"{sorted(READOUT_TAPS)} (e.g. blocks+white64)")
    return ReadoutSpec(name, k, l2, sqrt)


def fit_into_checkpoint(checkpoint: str, urls: list[str], name: str, dims: int | Sequence[int],
                        sigma: float, draws: int, seed: int, limit: int | None = None,
                        make_default: bool = True, on_batch=None, l2: bool = False,
                        sqrt: bool = False, out: str | None = None) -> str:
    """Fit whitened readouts (one per entry of `dims`, all from one pass over the shards) and
    store them inside the checkpoint (extras 'readout.<name>+white<K>.mean/.proj'); the weights,
    and so the model's sha256, are unchanged. Returns the label of the first, e.g.
    'blocks+white64' (+'+l2' with l2), which becomes the default with make_default. With
    `out`, the checkpoint is written there instead (weights, config and the new readouts)."""
    from . import checkpoint as ckpt
    from .phi import features
    from .shards import loader

    c = ckpt.load(checkpoint)
    base = Readout(name, sqrt=sqrt)
    rows: list[np.ndarray] = []
    n = 0
    for batch in loader(urls, 64, workers=1):
        if not batch.samples:
            continue
        f = features(c.model, batch.images(), sigma, draws, seed, base.taps)
        rows.append(base.concat(f))
        n += len(batch)
        if on_batch:
            on_batch(len(batch))
        if limit and n >= limit:
            break
    x = np.concatenate(rows)[:limit]
    extras, info = dict(c.extras), dict(c.info)
    labels = []
    for k in ([dims] if isinstance(dims, int) else list(dims)):
        w = Whitening.fit(x, k)
        extras.update(w.to_tensors(f"readout.{Readout(name, w, sqrt=sqrt).label}"))
        labels.append(Readout(name, w, l2, sqrt).label)
        info.setdefault("readouts", {})[labels[-1]] = {
            "fitted_on": urls, "images": len(x), "sigma": sigma, "draws": draws, "seed": seed}
    label = labels[0]
    if make_default:
        info["readout"] = label
        info["phi_defaults"] = {"sigma": sigma, "draws": draws, "seed": seed}
    ckpt.save(c.model, out or c.path, info, dtype=c.weights_dtype,
              preset_name=info.get("preset"), extras=extras)
    return label
