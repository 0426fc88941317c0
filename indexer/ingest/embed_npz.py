"""`idx embed`: φ of every sample of some shards, to an .npz file (no store needed)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable

import numpy as np
from phisearch.indexer.model.config import PhiConfig
from phisearch.indexer.model.embedder import Embedder
from phisearch.indexer.sources.loader import loader
from phisearch.indexer.sources.shards import expand


def embed_shards(data: list[str], out: str, checkpoint: str | None = None, sigma: float = 0.2,
                 draws: int = 4, seed: int = 0, batch_size: int = 64, workers: int = 1,
                 device: str = "auto", on_batch: Callable[[int], object] | None = None) -> dict:
    """Writes keys, labels, label_names, shards, phi (N, C) and the settings. Returns a summary."""
    emb = Embedder.create(checkpoint, PhiConfig(sigma=sigma, draws=draws, seed=seed), device)
    keys, labels, names, shards, vecs = [], [], [], [], []
    skipped: Counter[str] = Counter()
    for batch in loader(expand(data), batch_size, workers=workers):
        skipped.update(s.reason for s in batch.skips)
        if not batch.samples:
            continue
        dense, _ = emb(batch.images())
        vecs.append(dense)
        for s in batch.samples:
            keys.append(s.key)
            labels.append(-1 if s.label is None else s.label)
            names.append(s.label_name or "")
            shards.append(os.path.basename(s.shard))
        if on_batch:
            on_batch(len(batch.samples))
    phi = np.concatenate(vecs) if vecs else np.zeros((0, emb.dim), np.float32)
    meta = emb.meta()
    tmp = out + ".tmp.npz"
    np.savez(tmp, keys=np.array(keys), labels=np.array(labels, np.int64),
             label_names=np.array(names), shards=np.array(shards), phi=phi,
             **{f"meta_{k}": np.array(v) for k, v in meta.items()})
    os.replace(tmp, out)
    return {"count": len(keys), "skipped": dict(skipped), "dim": int(phi.shape[1])}
