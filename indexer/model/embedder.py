"""The model plus φ settings plus readout: one object that turns images into a collection's
vectors, and the identity a collection records so it can refuse vectors made any other way."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from phisearch.indexer.model import checkpoint as ckpt
from phisearch.indexer.model.config import PhiConfig
from phisearch.indexer.model.heap import keep_freed_memory
from phisearch.indexer.model.phi import MID, fast_layout, features
from phisearch.indexer.model.readout import Readout, check_fitted_for

DEVICES = ("auto", "cpu", "cuda")


def device_problem(name: str, here: bool = True) -> str | None:
    """Why --device NAME cannot be used (here: on this machine too), in one line, or None:
    every command that takes --device (serve and the UI included) refuses the same way, before
    anything is loaded."""
    if name not in DEVICES:
        return f'unknown device "{name}"; use {", ".join(DEVICES)}'
    if here and name == "cuda" and not torch.cuda.is_available():
        return 'device "cuda": torch sees no CUDA device here (use cpu or auto)'
    return None


def pick_device(name: str = "auto") -> torch.device:
    problem = device_problem(name)
    if problem:
        raise ValueError(problem)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def checkpoint_stamp(name: str | None) -> tuple:
    """What changes whenever the checkpoint file a collection names is rewritten: its path,
    inode, size and mtime, and its JSON record's. `idx fit-readout` rewrites a checkpoint in
    place and keeps the weights' hash, so a model cache keyed on the collection's identity alone
    would keep a model the file no longer holds; keyed on this too, it loads the file again
    (and check_identity then refuses it if it no longer makes the collection's vectors)."""
    path = ckpt.resolve(name)
    out: list = [str(path)]
    for p in (path, path.with_suffix(".json")):
        try:
            s = p.stat()
            out += [s.st_ino, s.st_size, s.st_mtime_ns]
        except FileNotFoundError:
            out += [None, None, None]
    return tuple(out)


def sparse_of(mid: np.ndarray) -> list[tuple[list[int], list[float]]]:
    """The non-zero channels of each row of (N, C) middle-block means."""
    out = []
    for row in mid:
        idx = np.flatnonzero(row > 0)
        out.append((idx.tolist(), row[idx].astype(np.float32).tolist()))
    return out


def dense_of(rows: list[tuple[list[int], list[float]]], dim: int) -> np.ndarray:
    """The inverse of sparse_of: (N, dim) float32 middle-block means, zero where absent."""
    out = np.zeros((len(rows), dim), np.float32)
    for r, (idx, vals) in enumerate(rows):
        if len(idx):
            out[r, np.asarray(idx, int)] = vals
    return out


@dataclass
class Embedder:
    checkpoint: ckpt.Checkpoint
    phi: PhiConfig
    readout: Readout
    device: torch.device

    @classmethod
    def create(cls, checkpoint: str | None = None, phi: PhiConfig | None = None,
               device: str = "auto") -> Embedder:
        dev = pick_device(device)
        keep_freed_memory()   # φ passes on CPU: no page faults for every batch (heap.py)
        c = ckpt.load(checkpoint, dev)
        phi = phi or PhiConfig(readout=c.info.get("readout", "mid"))
        check_fitted_for(phi.readout, c.info, phi.sigma, phi.draws, c.name)
        readout = Readout.from_checkpoint(phi.readout, c.extras)
        fast_layout(c.model)   # the φ pass in the faster memory format (same values)
        return cls(c, phi, readout, dev)

    @classmethod
    def from_meta(cls, meta: dict, device: str = "auto") -> Embedder:
        """Load the model, readout and φ settings a collection's meta names. Only the weights'
        hash is checked here: the caller checks the whole identity (store.check_identity, via
        search.query.embedder_for), since a checkpoint refitted in place keeps its weights."""
        phi = PhiConfig(sigma=meta["sigma"], draws=meta["draws"], seed=meta["seed"],
                        readout=meta.get("readout", "mid"))
        e = cls.create(meta.get("checkpoint"), phi, device)
        if e.checkpoint.sha256 != meta["model_sha256"]:
            raise ValueError(
                f"the collection was built with model {meta['model_sha256'][:12]} but checkpoint "
                f"{meta.get('checkpoint')} is {e.checkpoint.sha256[:12]}; pass --checkpoint")
        return e

    @property
    def dim(self) -> int:
        if self.readout.whitening is not None:
            return int(self.readout.whitening.proj.shape[1])
        widths = dict(zip(("E1.out", "E2.out", "E3.out", MID), self.checkpoint.model.cfg.widths))
        return int(sum(widths[t] for t in self.readout.taps))

    def meta(self) -> dict:
        """What a collection records; the identity keys must match for vectors to be added."""
        path = self.checkpoint.path
        builtin = path is not None and path.parent == ckpt.BUILTIN_DIR
        return {
            "model_sha256": self.checkpoint.sha256,
            "checkpoint": path.stem if builtin else str(path),
            "readout": self.readout.label,
            "readout_sha256": self.readout.sha256(),
            "sigma": float(self.phi.sigma),
            "draws": int(self.phi.effective_draws),
            "seed": int(self.phi.seed),
            "dim": self.dim,
            "sparse_dim": self.checkpoint.model.mid_channels,
        }

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 64, 64, 3) uint8 -> (dense (N, dim), middle-block means (N, C_M)), float32."""
        taps = tuple(dict.fromkeys(self.readout.taps + (MID,)))
        f = features(self.checkpoint.model, images, self.phi.sigma, self.phi.effective_draws,
                     self.phi.seed, taps)
        return self.readout.vectors(f), f[MID].numpy()
