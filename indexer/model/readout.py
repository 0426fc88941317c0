"""Readouts: which network activations form a collection's dense `phi` vector.

`mid` is the paper's φ (middle-block channel means, SPEC §2). `blocks` concatenates the means of
every encoder block's output and the middle block's. Either may be whitened: PCA to K dims with
unit variance per dim, fitted on training-set vectors and stored with the checkpoint, so that
Euclidean distance weighs every direction of variation alike. The sparse `phi_sparse` vector is
always the middle block's non-zero channels, whatever the readout.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from phisearch.indexer.model.phi import MID
from torch import Tensor

READOUT_TAPS: dict[str, tuple[str, ...]] = {
    "mid": (MID,),
    "blocks": ("E1.out", "E2.out", "E3.out", MID),
}


def principal_axes(x: np.ndarray, k: int):
    """A fitted scikit-learn PCA of x (N, D) keeping min(k, N, D) axes (exact SVD, in float64;
    scikit-learn fixes the axes' signs, so a fit is the same on every machine)."""
    from sklearn.decomposition import PCA

    x = np.asarray(x, np.float64)
    return PCA(n_components=min(k, *x.shape), svd_solver="full").fit(x)


@dataclass(frozen=True)
class Whitening:
    """x -> (x - mean) @ proj, proj = V_k / sqrt(λ_k): PCA to K dims, unit variance."""

    mean: np.ndarray   # (D,)
    proj: np.ndarray   # (D, K)

    @classmethod
    def fit(cls, x: np.ndarray, k: int, eps: float = 1e-6) -> Whitening:
        """scikit-learn's PCA (exact SVD, deterministic signs) to k dims, scaled to unit
        variance; stored as (mean, proj) so applying it needs no scikit-learn."""
        pca = principal_axes(x, k)
        proj = pca.components_.T / np.sqrt(pca.explained_variance_ + eps)
        return cls(pca.mean_.astype(np.float32), proj.astype(np.float32))

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


def fitted_settings(label: str, info: dict) -> tuple[float, int] | None:
    """(σ, draws) of the φ a whitened readout was fitted on, from the checkpoint's JSON: its own
    record (the +l2 variant shares the whitening), else the checkpoint's φ defaults."""
    fits = info.get("readouts") or {}
    base = label.removesuffix("+l2")
    rec = fits.get(label) or fits.get(base) or fits.get(base + "+l2") or info.get("phi_defaults")
    if not rec or "sigma" not in rec:
        return None
    sigma = float(rec["sigma"])
    return sigma, 1 if sigma == 0 else int(rec.get("draws", 1))


def check_fitted_for(label: str, info: dict, sigma: float, draws: int, where: str = "") -> None:
    """A whitening belongs to the φ settings it was fitted on: refuse others with one line
    (a whitening fitted at σ 0.2 scores 0.43 kNN@10 at σ 0 where its own scores 0.52)."""
    if parse_label(label).white is None:
        return
    fit = fitted_settings(label, info)
    draws = 1 if sigma == 0 else draws
    if fit is None or (abs(fit[0] - sigma) < 1e-9 and fit[1] == draws):
        return
    spec = parse_label(label)
    raise ValueError(
        f'readout "{label}" was fitted on φ at σ {fit[0]:g} with {fit[1]} draw(s), not σ '
        f"{sigma:g} with {draws}: fit one for these settings (idx fit-readout --checkpoint "
        f"{where or 'C'} --out NEW.safetensors --readout {spec.name} --dims {spec.white}"
        f"{' --l2' if spec.l2 else ''}{' --sqrt' if spec.sqrt else ''} --sigma {sigma:g} "
        f"--draws {draws}) or pass --readout mid")


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
