"""Nearest neighbours by image, key, id or vector, and explanations of a match.

An uploaded image goes through the collection's own preprocessing, checkpoint and φ settings
(read from the collection's metadata), never the CLI defaults, so a store built long ago stays
searchable after a default changes. The loaded model must make the collection's vectors: its
whole identity (store.IDENTITY_KEYS, the readout's whitening included) is checked against the
collection's (embedder_for), so a checkpoint changed since the build is refused in one line.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np
from phisearch.indexer.manage.aliases import missing_collection
from phisearch.indexer.model.embedder import Embedder, dense_of
from phisearch.indexer.sources import images
from phisearch.indexer.store import CLUSTERS_DOC, Hit, Store
from phisearch.indexer.store.base import check_identity, prepare_meta

# `path`: a folder file's location (null for shard samples), so a hit can be opened.
HIT_KEYS = ("key", "label", "label_name", "cluster_id", "dataset", "shard", "path")


class NotFound(LookupError):
    pass


def require_meta(store: Store, where: str = "") -> dict:
    """The collection's metadata; a missing one names the collections that do exist."""
    meta = store.meta()
    if meta is None:
        raise NotFound(missing_collection(store.cfg))
    return meta


def embedder_for(meta: dict, device: str = "cpu", where: str = "the collection") -> Embedder:
    """The model, readout and φ settings a collection was built with, loaded from the
    checkpoint its meta names, and checked to make the same vectors: every identity key, the
    readout's sha256 included (a checkpoint refitted in place keeps its weights' hash).
    Raises MetaMismatch (one line) when they differ; ValueError / OSError when it cannot load."""
    emb = Embedder.from_meta(meta, device)
    made = prepare_meta(emb.meta())   # as a build would record it (schema_version filled in)
    source = f"checkpoint {meta.get('checkpoint')}"
    check_identity(meta, made, where, source)
    return emb


def hit_json(h: Hit) -> dict:
    """The CONTRACT's hit shape: id, key, label, label_name, distance, cluster_id (+ dataset,
    shard and path); every key is present, null when the point has no value."""
    out = {"id": h.id, "distance": round(float(h.distance), 6)}
    out.update({k: h.payload.get(k) for k in HIT_KEYS})
    return out


def hit_line(rank: int, row: dict) -> str:
    """One hit for the terminal: rank, distance, key, then only what the point has (a label,
    a cluster, a folder file's path); never "label=None (None)"."""
    parts = [f"{rank:3d}  {row['distance']:9.4f}  {row['key']}"]
    if row.get("label") is not None:
        name = row.get("label_name")
        parts.append(f"label={row['label']}" + (f" ({name})" if name else ""))
    if row.get("cluster_id") is not None:
        parts.append("noise" if row["cluster_id"] < 0 else f"cluster={row['cluster_id']}")
    if row.get("path"):
        parts.append(row["path"])
    return "  ".join(parts)


FILTER_NAMES = {"label": "label", "cluster_id": "cluster", "dataset": "dataset"}


def why_no_match(store: Store, flt: dict | None) -> str | None:
    """Why a filtered search found nothing, in one line (None when some point matches, or
    without a filter): a cluster filter on an unclustered collection, a value no point has,
    or conditions that each match but never together."""
    if not flt or store.count(flt):
        return None
    clusters = store.get_doc(CLUSTERS_DOC) if "cluster_id" in flt else None
    for field, value in flt.items():
        name = FILTER_NAMES.get(field, field)
        if field == "cluster_id" and clusters is None:
            return (f"cluster {value} cannot match: the collection is not clustered yet "
                    "(run `idx cluster`)")
        if store.count({field: value}):
            continue
        if field == "cluster_id":
            n = len(clusters.get("clusters", []))
            have = f"clusters 0..{n - 1} and -1 (noise)" if n else "only -1 (noise)"
            return f"cluster {value} cannot match: the last `idx cluster` made {have}"
        return f"{name} {value!r} cannot match: no point in the collection has it"
    together = " and ".join(f"{FILTER_NAMES.get(f, f)} {v!r}" for f, v in flt.items())
    return f"no point has {together} together"


@dataclass
class Target:
    """What a query searches from: a dense vector and the middle-block means (for --explain)."""

    vector: np.ndarray
    mid: np.ndarray
    id: str | None = None
    key: str | None = None


def target_from_image(data: bytes, embedder: Embedder) -> Target:
    img = images.decode(data)  # raises images.BadImage with a reason
    dense, mid = embedder(img[None])
    return Target(dense[0], mid[0])


def target_from_hit(h: Hit, sparse_dim: int) -> Target:
    mid = dense_of([h.sparse or ([], [])], sparse_dim)[0]
    return Target(np.asarray(h.vector, np.float32), mid, h.id, h.payload.get("key"))


def target_from_id(store: Store, point_id: str, sparse_dim: int) -> Target:
    try:
        uuid.UUID(point_id)
    except ValueError:   # the store would fail on it with an error about its own parser
        raise NotFound(f"no point with id {point_id}: point ids are UUIDs") from None
    hits = store.retrieve([point_id], with_vectors=True)
    if not hits:
        raise NotFound(f"no point with id {point_id}")
    return target_from_hit(hits[0], sparse_dim)


def target_from_key(store: Store, key: str, sparse_dim: int, dataset: str | None = None
                    ) -> Target:
    flt = {"key": key} if dataset is None else {"key": key, "dataset": dataset}
    found = list(store.scroll(flt, with_vectors=True, batch=4))
    if not found:
        raise NotFound(f'no point with key "{key}"')
    if len(found) > 1:
        sets = sorted({h.payload.get("dataset") for h in found})
        raise NotFound(f'key "{key}" is in several datasets {sets}: pass --dataset')
    return target_from_hit(found[0], sparse_dim)


def search(store: Store, target: Target, k: int = 10, filter: dict | None = None,
           max_distance: float | None = None) -> list[Hit]:
    hits = store.search(target.vector, limit=k, filter=filter)
    if max_distance is not None:
        hits = [h for h in hits if h.distance <= max_distance]
    return hits


def explain(a: np.ndarray, b: np.ndarray, top: int = 8,
            leave_out: np.ndarray | None = None) -> dict:
    """Which middle-block channels drive the distance between two φ, and which they share.
    a, b: (C,) non-negative channel means. Contributions are (a_c - b_c)², as a share of ||a-b||²;
    a channel equal in both drives nothing and is not listed.
    leave_out: (C,) bool, channels not listed (active in almost every image, they say little);
    their share of the distance is reported as `left_out_share`."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    skip = np.zeros(a.shape, bool) if leave_out is None else np.asarray(leave_out, bool)
    d2 = (a - b) ** 2
    total = d2.sum()
    order = [c for c in np.argsort(-d2) if d2[c] > 0 and not skip[c]][:top]
    shared_idx = np.flatnonzero((a > 0) & (b > 0))
    listed = shared_idx[~skip[shared_idx]]
    shared = listed[np.argsort(-np.minimum(a, b)[listed])][:top]
    out = {
        "distance": float(np.sqrt(total)),
        "drivers": [{"channel": int(c), "a": float(a[c]), "b": float(b[c]),
                     "share": float(d2[c] / total) if total else 0.0} for c in order],
        "shared": [{"channel": int(c), "a": float(a[c]), "b": float(b[c])} for c in shared],
        "active": {"a": int((a > 0).sum()), "b": int((b > 0).sum()), "both": len(shared_idx)},
    }
    if leave_out is not None:   # the terminal's --explain shape stays as it was
        out.update(left_out=int(skip.sum()),
                   left_out_share=float(d2[skip].sum() / total) if total else 0.0)
    return out
