"""Fitting a whitened readout on training images and storing it inside a checkpoint."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from phisearch.indexer.model import checkpoint as ckpt
from phisearch.indexer.model.phi import features
from phisearch.indexer.model.readout import Readout, Whitening
from phisearch.indexer.sources.loader import loader


def fit_into_checkpoint(checkpoint: str, urls: list[str], name: str, dims: int | Sequence[int],
                        sigma: float, draws: int, seed: int, limit: int | None = None,
                        make_default: bool = True, on_batch=None, l2: bool = False,
                        sqrt: bool = False, out: str | None = None) -> str:
    """Fit whitened readouts (one per entry of `dims`, all from one pass over the shards) and
    store them inside the checkpoint (extras 'readout.<name>+white<K>.mean/.proj'); the weights,
    and so the model's sha256, are unchanged. Returns the label of the first, e.g.
    'blocks+white64' (+'+l2' with l2), which becomes the default with make_default. With
    `out`, the checkpoint is written there instead (weights, config and the new readouts)."""
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
