"""The store interface: types, filters, errors and the schema constants. Imports no backend.

Callers never branch on the backend. Both hold the same schema: a dense named vector `phi`
(Euclid; the collection's readout) for nearest-neighbour search and a sparse `phi_sparse` (the
paper's φ: the middle block's non-zero channel means) for channel queries. Collection metadata
and side documents (resume records, cluster summaries) are never points of the collection, so
`count()` always equals the number of indexed samples (CONTRACT.md).

A `Backend` is a place that holds collections (an Edge folder, a Qdrant server): collections,
aliases and snapshot listings, none of which need a collection handle. A `Store` is one open
collection.
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from typing_extensions import Self

SCHEMA_VERSION = 1
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "phisearch")
DENSE = "phi"
SPARSE = "phi_sparse"
# A collection refuses to be built further with other values of these (MetaMismatch).
IDENTITY_KEYS = ("model_sha256", "readout", "readout_sha256", "sigma", "draws", "seed",
                 "schema_version", "dim")
# Payload indexes: what filters and facets use.
INDEXES = {"label": "integer", "cluster_id": "integer", "split": "keyword", "shard": "keyword",
           "dataset": "keyword", "key": "keyword"}
# Every payload key a point can carry (docs/collection-schema.md): what a filter may name.
PAYLOAD_KEYS = ("dataset", "split", "shard", "shard_url", "key", "label", "label_name",
                "phi_norm", "active_channels", "model_sha256", "readout", "sigma", "draws",
                "seed", "schema_version", "thumb", "path", "cluster_id", "cluster_prob")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_RANGE_OPS = ("gt", "gte", "lt", "lte")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1   # Qdrant's integer payloads
SNAPSHOT_DIR = ".snapshots"                  # Edge: <store>/.snapshots/<collection>/
# The side documents of a collection (docs/collection-schema.md), never points of it:
SHARDS_DOC = "shards"        # resume records: shard path -> {fingerprint, indexed, skipped, ...}
LAST_RUN_DOC = "last_run"    # the last build's summary (idx status)
CLUSTERS_DOC = "clusters"    # idx cluster's summary: sizes, centroids, exemplars


def point_id(dataset: str, key: str) -> str:
    """Deterministic id, so re-indexing a sample overwrites its point (CONTRACT.md)."""
    return str(uuid.uuid5(NAMESPACE, f"{dataset}/{key}"))


class StoreError(Exception):
    """A store problem the user can act on; the message is one line."""


class MetaMismatch(StoreError):
    """The collection was built with another model, readout or φ settings."""


class StoreBusy(StoreError):
    """An Edge collection is held open by another handle, or a server collection's write lease
    by another writer (e.g. a running `idx build`)."""


@dataclass(frozen=True)
class StoreConfig:
    path: str | None = None        # Edge store folder (holds one sub-folder per collection)
    url: str | None = None         # Qdrant server URL (wins over path)
    api_key: str | None = None
    collection: str = "phisearch"
    prefer_grpc: bool = False
    timeout: float = 30.0
    busy_wait: float = 10.0        # Edge: seconds to wait for a held collection's lock
    yields: bool = False           # Edge: a long-lived reader (holder.py): never takes the lock
                                   # while a writer waits for it

    @property
    def where(self) -> str:
        """The collection and its place, for messages (an alias is resolved only at open)."""
        if self.url:
            return f"Qdrant at {self.url} collection {self.collection}"
        return f"store {self.path} collection {self.collection}"

    @property
    def location(self) -> str:
        """The place alone, normalized: two configs with one location share collections."""
        import os

        return self.url.rstrip("/") if self.url else os.path.realpath(self.path or "")


@dataclass
class PointData:
    """One sample as the pipeline writes it."""

    id: str
    vector: np.ndarray             # dense float32 (dim,) -> "phi"
    sparse_indices: list[int]      # -> "phi_sparse"
    sparse_values: list[float]
    payload: dict


@dataclass
class Hit:
    """A point as a call returns it. `distance` is set by search() (Euclidean, not squared,
    ascending), `dot` by search_sparse() (descending); retrieve() and scroll() set neither."""

    id: str
    payload: dict
    vector: np.ndarray | None = None                 # the dense readout, when asked for
    sparse: tuple[list[int], list[float]] | None = None
    distance: float | None = None
    dot: float | None = None


def hit_of(p: Any, with_vectors: bool, score: str | None = None) -> Hit:
    """A Hit from a point as either engine returns it (Edge and qdrant-client records share
    id, payload, score and a {name: vector} dict); `score` names the Hit field it fills."""
    hit = Hit(id=str(p.id), payload=dict(p.payload or {}))
    if score is not None:
        setattr(hit, score, float(p.score))
    if with_vectors and isinstance(p.vector, dict):
        if DENSE in p.vector:
            hit.vector = np.asarray(p.vector[DENSE], dtype=np.float32)
        sp = p.vector.get(SPARSE)
        hit.sparse = (list(sp.indices), list(sp.values)) if sp is not None else ([], [])
    return hit


class Cond(NamedTuple):
    """One backend-neutral filter condition; each backend translates these once."""

    key: str
    kind: str      # "value" | "any" | "range" | "null"
    value: Any


def parse_filter(filter: dict | None) -> list[Cond]:
    """{field: value} -> match; list -> any of; {"gte": a, "lte": b} -> range; None -> is null.
    All conditions must hold."""
    conds: list[Cond] = []
    for key, v in (filter or {}).items():
        if isinstance(v, dict):
            bad = set(v) - set(_RANGE_OPS)
            if bad or not v:
                raise StoreError(f"filter on {key!r}: a range takes gt/gte/lt/lte, got {sorted(v)}")
            conds.append(Cond(key, "range", {op: float(x) for op, x in v.items()}))
        elif isinstance(v, (list, tuple, set)):
            conds.append(Cond(key, "any", [_scalar(x) for x in v]))
        elif v is None:
            conds.append(Cond(key, "null", None))
        elif isinstance(v, (float, np.floating)) and not float(v).is_integer():
            conds.append(Cond(key, "range", {"gte": float(v), "lte": float(v)}))
        else:
            conds.append(Cond(key, "value", _scalar(v)))
    return conds


def _scalar(v: Any) -> Any:
    """Match values must be str, int or bool (Qdrant has no exact float match)."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)) or (isinstance(v, (float, np.floating))
                                            and float(v).is_integer()):
        if not INT64_MIN <= int(v) <= INT64_MAX:
            raise StoreError(f"cannot match on {v}: integers are 64-bit in Qdrant")
        return int(v)
    if isinstance(v, str):
        return v
    raise StoreError(f"cannot match on {v!r} ({type(v).__name__}): use str, int or a range")


def plain(obj: Any) -> Any:
    """JSON-safe copy (numpy scalars/arrays, tuples): payloads and docs must round-trip alike
    in both backends."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def check_name(name: str, what: str) -> str:
    """Collection and doc names become folder/file names: keep them plain."""
    if not _NAME_RE.match(name or ""):
        raise StoreError(f"invalid {what} name {name!r}: use letters, digits, '_', '.', '-'")
    return name


def identity(meta: dict) -> dict:
    """The identity part of a collection's meta: what its vectors depend on."""
    return {k: meta.get(k) for k in IDENTITY_KEYS}


def _diffs(stored: dict, wanted: dict, label: str) -> list[str]:
    return [f"{k} stored {stored.get(k)!r} vs {label} {wanted.get(k)!r}"
            for k in IDENTITY_KEYS if stored.get(k) != wanted.get(k)]


def check_meta(stored: dict, wanted: dict, where: str) -> None:
    """Raise MetaMismatch naming every identity key whose value differs (a build adding to a
    collection)."""
    diffs = _diffs(stored, wanted, "requested")
    if diffs:
        raise MetaMismatch(f"{where} was built with other settings: {'; '.join(diffs)} "
                           "(use another --collection, or delete it to rebuild)")


def check_identity(stored: dict, made: dict, where: str, source: str) -> None:
    """Raise MetaMismatch when the model and φ settings loaded to read a collection (query,
    serve, the UI, reconstruct) would make other vectors than the stored ones: `made` is what
    that embedder would record. A checkpoint rewritten in place (idx fit-readout keeps the
    weights' hash but changes readout_sha256) is caught here."""
    diffs = _diffs(stored, made, "now")
    if diffs:
        raise MetaMismatch(f"{where} was built with other settings than {source} gives now: "
                           f"{'; '.join(diffs)} (was the checkpoint changed, e.g. by idx "
                           "fit-readout? rebuild the collection, or restore the checkpoint "
                           "it was built with)")


def prepare_meta(meta: dict) -> dict:
    """The meta as stored: plain JSON, schema_version filled in, dim required."""
    m = plain(dict(meta))
    m.setdefault("schema_version", SCHEMA_VERSION)
    if not isinstance(m.get("dim"), int) or m["dim"] < 1:
        raise StoreError(f"collection meta needs an integer 'dim' >= 1, got {m.get('dim')!r}")
    return m


def dense_list(p: PointData, dim: int | None) -> list[float]:
    """The dense vector as a list of floats, its shape checked with a clear message."""
    v = np.asarray(p.vector, dtype=np.float32)
    if v.ndim != 1 or (dim is not None and v.shape[0] != dim):
        raise StoreError(f"point {p.id}: vector shape {v.shape}, the collection holds ({dim},)")
    return v.tolist()


class Store(ABC):
    """One open collection. Write commands call ensure() first; read commands check meta()."""

    backend: str
    cfg: StoreConfig
    name: str   # the collection actually opened (an alias resolved to its target)
    names_snapshots: bool = False   # whether snapshot() takes a name given by the user

    @abstractmethod
    def meta(self) -> dict | None: ...
    @abstractmethod
    def ensure(self, meta: dict) -> None: ...
    @abstractmethod
    def claim_write(self) -> None:
        """About to write: take now what a writer needs (a server's write lease), so that a
        collection busy with another writer is refused (StoreBusy) before a command spends
        minutes on work it cannot write. Held until close(); repeated calls are no-ops."""
    @abstractmethod
    def upsert(self, points: list[PointData]) -> None: ...
    @abstractmethod
    def count(self, filter: dict | None = None) -> int: ...
    @abstractmethod
    def _query(self, query: Any, using: str, limit: int, filter: dict | None,
               with_vectors: bool, score: str) -> list[Hit]:
        """Nearest points to `query` in the vector named `using`; Hits with `score` set."""
    @abstractmethod
    def _sparse(self, indices: list[int], values: list[float]) -> Any:
        """The engine's sparse-vector object."""

    def search(self, vector: np.ndarray, limit: int = 10, filter: dict | None = None,
               with_vectors: bool = False) -> list[Hit]:
        """Nearest by Euclidean distance in the dense readout, ascending (0.0 for the point
        itself: both engines return the true distance)."""
        vec = np.asarray(vector, dtype=np.float32).ravel().tolist()
        return self._query(vec, DENSE, limit, filter, with_vectors, "distance")

    def search_sparse(self, indices: list[int], values: list[float], limit: int = 10,
                      filter: dict | None = None) -> list[Hit]:
        """Largest dot product with the sparse middle-block vector, descending."""
        if len(indices) == 0:
            return []
        sv = self._sparse([int(i) for i in indices], [float(v) for v in values])
        return self._query(sv, SPARSE, limit, filter, False, "dot")

    @abstractmethod
    def retrieve(self, ids: list[str], with_vectors: bool = True) -> list[Hit]: ...
    @abstractmethod
    def scroll(self, filter: dict | None = None, with_vectors: bool = False,
               batch: int = 512) -> Iterator[Hit]: ...
    @abstractmethod
    def set_payload(self, updates: dict[str, dict]) -> None: ...
    @abstractmethod
    def delete(self, ids: list[str] | None = None, filter: dict | None = None) -> int: ...
    @abstractmethod
    def get_doc(self, name: str) -> dict | None: ...
    @abstractmethod
    def put_doc(self, name: str, doc: dict) -> None: ...
    @abstractmethod
    def drop(self) -> None:
        """Delete the collection with its metadata and docs (rebuild from scratch, tests)."""
    @abstractmethod
    def close(self) -> None: ...
    @abstractmethod
    def snapshot(self, name: str | None = None) -> dict:
        """Take a snapshot of the collection: {name, collection, points, created_at, ...};
        `name` only where names_snapshots (a Qdrant server names its snapshots itself)."""
    @abstractmethod
    def restore(self, name: str) -> dict:
        """Replace the collection with snapshot `name`: exactly its points, payloads and docs.
        The store is closed afterwards."""

    def others_waiting(self) -> bool:
        """Whether another process waits for this collection (Edge: its lock's markers), so a
        long-lived reader should let go; a server has no such wait."""
        return False

    @property
    def is_built(self) -> bool:
        """Whether the collection existed (had been built) when this handle looked."""
        return self.meta() is not None

    def optimize(self) -> None:
        """Merge segments / build HNSW now (Edge does it only when asked; a server on its own)."""

    @property
    def where(self) -> str:
        """Names the collection in messages."""
        return f"collection {self.cfg.collection}"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def group_payloads(updates: dict[str, dict]) -> dict[str, tuple[dict, list[str]]]:
    """Points that get the same fields share one update (cluster_id writes batch by cluster)."""
    groups: dict[str, tuple[dict, list[str]]] = {}
    for pid, fields in updates.items():
        fields = plain(fields)
        groups.setdefault(json.dumps(fields, sort_keys=True), (fields, []))[1].append(pid)
    return groups


class Backend(ABC):
    """A place that holds collections: an Edge store folder or a Qdrant server. What it
    answers needs no collection handle, so it works while a build holds one."""

    kind: str                   # "edge" | "server"
    shares_handles: bool        # True: any number of processes may hold a collection open
    cfg: StoreConfig

    @abstractmethod
    def open(self, collection: str | None = None) -> Store:
        """Open a collection (cfg.collection by default; an alias resolves to its target)."""
    @abstractmethod
    def collections(self) -> list[str]:
        """The phisearch collections here, sorted."""
    @abstractmethod
    def metas(self) -> dict[str, dict]:
        """{collection: its metadata} for every collection, read without opening any."""
    @abstractmethod
    def aliases(self) -> dict[str, str]:
        """{alias: collection}."""
    @abstractmethod
    def set_alias(self, alias: str, target: str) -> str | None:
        """Point `alias` at collection `target` atomically; returns the previous target."""
    @abstractmethod
    def delete_alias(self, alias: str) -> str:
        """Remove an alias (never a collection); returns the target it pointed at."""
    @abstractmethod
    def snapshots(self, collection: str) -> list[dict]:
        """Snapshots of a collection, oldest first."""

    @property
    def where(self) -> str:
        """Names the place in messages."""
        return self.kind

    def close(self) -> None:
        """Let go of any connection (a server client); an Edge folder holds none."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has(self, name: str) -> bool:
        """Whether `name` is a built collection here, or an alias of one."""
        cols = self.collections()
        return name in cols or self.aliases().get(name) in cols

    def check_alias(self, alias: str, target: str) -> None:
        """The rules every backend applies before switching an alias."""
        check_name(alias, "alias")
        check_name(target, "collection")
        if alias == target:
            raise StoreError("an alias cannot point at itself")
        cols = set(self.collections())
        if target not in cols:
            raise StoreError(f"no collection {target} in {self.where} (known: "
                             f"{', '.join(sorted(cols)) or 'none'})")
        if alias in cols:
            raise StoreError(f"{alias} is a collection in {self.where}; an alias cannot shadow "
                             "it (drop it or pick another alias name)")
