"""The vector store: one interface over Qdrant Edge (in-process, a folder) and a Qdrant server.

Callers never branch on the backend. Both hold the same schema: a dense named vector `phi`
(Euclid) for nearest-neighbour search and a sparse `phi_sparse` for channel queries. Collection
metadata and side documents (resume records, cluster summaries) are never points of the
collection, so `count()` always equals the number of indexed samples (CONTRACT.md):
  Edge:   <path>/<collection>/shard/      the EdgeShard (WAL on: survives a crash)
          <path>/<collection>/meta.json   collection metadata
          <path>/<collection>/docs/*.json documents, replaced atomically
  Server: collection <collection> plus a companion <collection>__phisearch_meta (store_server.py).
Edge allows one open handle per shard folder, and loading a shard that another process is
closing can lose its points, so every open takes our lock (store_lock.py) first, waits for it up
to `busy_wait` seconds and then raises StoreBusy; the lock is released after close().
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .store_lock import CollectionLock, LockTimeout, describe

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

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
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_RANGE_OPS = ("gt", "gte", "lt", "lte")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1   # Qdrant's integer payloads


def point_id(dataset: str, key: str) -> str:
    """Deterministic id, so re-indexing a sample overwrites its point (CONTRACT.md)."""
    return str(uuid.uuid5(NAMESPACE, f"{dataset}/{key}"))


class StoreError(Exception):
    """A store problem the user can act on; the message is one line."""


class MetaMismatch(StoreError):
    """The collection was built with another model, readout or φ settings."""


class StoreBusy(StoreError):
    """An Edge collection is held open by another handle (e.g. a running `idx build`)."""


@dataclass(frozen=True)
class StoreConfig:
    path: str | None = None        # Edge store folder (holds one sub-folder per collection)
    url: str | None = None         # Qdrant server URL (wins over path)
    api_key: str | None = None
    collection: str = "phisearch"
    prefer_grpc: bool = False
    timeout: float = 30.0
    busy_wait: float = 10.0        # Edge: seconds to wait for a held collection's lock


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
    """A search/retrieve/scroll result. Dense score: Euclidean distance (ascending, not squared);
    sparse score: dot product (descending); retrieve/scroll: 0.0."""

    id: str
    score: float
    payload: dict
    vector: np.ndarray | None = None
    sparse: tuple[list[int], list[float]] | None = None


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


def check_meta(stored: dict, wanted: dict, where: str) -> None:
    """Raise MetaMismatch naming every identity key whose value differs."""
    diffs = [f"{k} stored {stored.get(k)!r} vs requested {wanted.get(k)!r}"
             for k in IDENTITY_KEYS if stored.get(k) != wanted.get(k)]
    if diffs:
        raise MetaMismatch(f"{where} was built with other settings: {'; '.join(diffs)} "
                           "(use another --collection, or delete it to rebuild)")


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
    """The store interface. Write commands call ensure() first; read commands check meta()."""

    backend: str
    cfg: StoreConfig
    name: str   # the collection actually opened (an alias resolved to its target)

    @abstractmethod
    def meta(self) -> dict | None: ...
    @abstractmethod
    def ensure(self, meta: dict) -> None: ...
    @abstractmethod
    def upsert(self, points: list[PointData]) -> None: ...
    @abstractmethod
    def count(self, filter: dict | None = None) -> int: ...
    @abstractmethod
    def search(self, vector: np.ndarray, limit: int = 10, filter: dict | None = None,
               with_vectors: bool = False) -> list[Hit]: ...
    @abstractmethod
    def search_sparse(self, indices: list[int], values: list[float], limit: int = 10,
                      filter: dict | None = None) -> list[Hit]: ...
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
    def collections(self) -> list[str]: ...
    @abstractmethod
    def drop(self) -> None:
        """Delete the collection with its metadata and docs (rebuild from scratch, tests)."""
    @abstractmethod
    def close(self) -> None: ...

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


def _group_payloads(updates: dict[str, dict]) -> dict[str, tuple[dict, list[str]]]:
    """Points that get the same fields share one update (cluster_id writes batch by cluster)."""
    groups: dict[str, tuple[dict, list[str]]] = {}
    for pid, fields in updates.items():
        fields = plain(fields)
        groups.setdefault(json.dumps(fields, sort_keys=True), (fields, []))[1].append(pid)
    return groups


def _write_json(path: Path, obj: dict) -> None:
    """tmp + fsync + os.replace: readers see the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read {path}: {e}") from e


def edge_collections(root: Path) -> list[str]:
    """The collections of an Edge store folder: sub-folders with a meta.json (no handle needed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if (d / "meta.json").is_file())


class EdgeStore(Store):
    """Qdrant Edge in-process: a shard folder per collection, with files beside it."""

    backend = "edge"

    def __init__(self, cfg: StoreConfig) -> None:
        import qdrant_edge as qe

        self.qe = qe
        self.cfg = cfg
        from .aliases import edge_resolve

        self.root = Path(cfg.path or "")
        self.name = edge_resolve(self.root, check_name(cfg.collection, "collection"))
        self.dir = self.root / self.name
        self.shard_dir = self.dir / "shard"
        self.shard = None
        self._dim: int | None = None
        # Every open takes our lock first and keeps it until close(): no phisearch process
        # ever calls EdgeShard.load on a shard another may hold (store_lock.py says why).
        self.lock = CollectionLock(self.root, self.name)
        try:
            self.lock.acquire(cfg.busy_wait)
        except LockTimeout as e:
            who = describe(e.holder)
            raise StoreBusy(f"{self.where} is in use by another process"
                            f"{f' ({who})' if who else ''} (e.g. a running idx build); retry "
                            "when it finishes") from None
        try:
            finish_swap(self.root, self.name)   # a restore killed mid-swap: finish or undo it
            clean_temporaries(self.root, self.name)
            if self.shard_dir.exists():   # a collection not yet built is opened by ensure()
                self.shard = self._load()
        except BaseException:
            self.lock.release()
            raise

    @property
    def where(self) -> str:
        alias = f" (alias of {self.name})" if self.name != self.cfg.collection else ""
        return f"store {self.root} collection {self.cfg.collection}{alias}"

    def _edge_config(self, dim: int):
        qe = self.qe
        return qe.EdgeConfig(
            vectors={DENSE: qe.EdgeVectorParams(size=dim, distance=qe.Distance.Euclid)},
            sparse_vectors={SPARSE: qe.EdgeSparseVectorParams()})

    def _load(self, config=None):
        """EdgeShard.load, under our lock. Never retried: a load attempted on a shard that is
        being closed can cost it its points, so a WouldBlock here means a process outside
        phisearch's lock holds the shard, and we say so instead of trying again."""
        try:
            return self.qe.EdgeShard.load(str(self.shard_dir), config)
        except Exception as e:
            if "WouldBlock" in str(e):
                raise StoreBusy(f"{self.where} is held by a process that does not take "
                                f"phisearch's lock ({self.lock.path}); close it and retry") from None
            raise StoreError(f"cannot open {self.where}: {e}") from e

    def _need(self):
        if self.shard is None:
            raise StoreError(f"{self.where} does not exist yet (run idx build first)")
        return self.shard

    def meta(self) -> dict | None:
        return _read_json(self.dir / "meta.json") if self.shard_dir.exists() else None

    def ensure(self, meta: dict) -> None:
        meta = prepare_meta(meta)
        stored = self.meta()
        if stored is not None:
            check_meta(stored, meta, self.where)
            if self.shard is None:
                self.shard = self._load()
            self._dim = stored["dim"]
            return
        qe, config = self.qe, self._edge_config(meta["dim"])
        if self.shard is None and not self.shard_dir.exists():
            log.info("creating %s (dim %d)", self.where, meta["dim"])
            try:
                self.shard = qe.EdgeShard.create(str(self.shard_dir), config)
            except Exception as e:
                raise StoreError(f"cannot create {self.where}: {e}") from e
        else:   # a create that stopped before meta.json: reuse it only while still empty
            if self.shard is None:
                self.shard = self._load(config)
            if self.count() > 0:
                raise StoreError(f"{self.where} holds points but no meta.json; not a phisearch "
                                 "collection? delete it to rebuild")
        for field, kind in INDEXES.items():
            schema = qe.PayloadSchemaType.Integer if kind == "integer" else \
                qe.PayloadSchemaType.Keyword
            self.shard.update(qe.UpdateOperation.create_field_index(field, schema))
        _write_json(self.dir / "meta.json", meta)   # last: the collection now exists
        self._dim = meta["dim"]

    def upsert(self, points: list[PointData]) -> None:
        qe, shard = self.qe, self._need()
        if self._dim is None:
            self._dim = (self.meta() or {}).get("dim")
        for i in range(0, len(points), 1024):
            batch = [qe.Point(id=p.id, payload=plain(p.payload), vector={
                DENSE: dense_list(p, self._dim),
                SPARSE: qe.SparseVector(indices=[int(j) for j in p.sparse_indices],
                                        values=[float(x) for x in p.sparse_values])})
                for p in points[i:i + 1024]]
            try:
                shard.update(qe.UpdateOperation.upsert_points(batch))
            except Exception as e:
                raise StoreError(f"upsert into {self.where} failed: {e}") from e

    def _filter(self, filter: dict | None, ids: list[str] | None = None):
        """The one translation of a plain-dict filter into an Edge Filter."""
        qe, must = self.qe, []
        for c in parse_filter(filter):
            if c.kind == "value":
                must.append(qe.FieldCondition(key=c.key, match=qe.MatchValue(c.value)))
            elif c.kind == "any":
                must.append(qe.FieldCondition(key=c.key, match=qe.MatchAny(c.value)))
            elif c.kind == "range":
                must.append(qe.FieldCondition(key=c.key, range=qe.RangeFloat(**c.value)))
            else:
                must.append(qe.IsNullCondition(c.key))
        if ids is not None:
            must.append(qe.HasIdCondition(set(ids)))
        return qe.Filter(must=must) if must else None

    def count(self, filter: dict | None = None) -> int:
        if self.shard is None:
            return 0
        return int(self.shard.count(self.qe.CountRequest(exact=True, filter=self._filter(filter))))

    def _hit(self, p: Any, with_vectors: bool) -> Hit:
        hit = Hit(id=str(p.id), score=float(getattr(p, "score", 0.0)), payload=dict(p.payload or {}))
        if with_vectors and p.vector:
            if DENSE in p.vector:
                hit.vector = np.asarray(p.vector[DENSE], dtype=np.float32)
            sp = p.vector.get(SPARSE)
            hit.sparse = (list(sp.indices), list(sp.values)) if sp is not None else ([], [])
        return hit

    def _query(self, vec: Any, using: str, limit: int, filter: dict | None,
               with_vectors: bool) -> list[Hit]:
        if self.shard is None:
            return []
        qe = self.qe
        req = qe.QueryRequest(limit=limit, query=qe.Query.Nearest(vec, using=using),
                              filter=self._filter(filter), with_payload=True,
                              with_vector=with_vectors)
        return [self._hit(p, with_vectors) for p in self.shard.query(req)]

    def search(self, vector: np.ndarray, limit: int = 10, filter: dict | None = None,
               with_vectors: bool = False) -> list[Hit]:
        # Edge scores Euclid as the true distance (0.0 for the point itself), ascending.
        vec = np.asarray(vector, dtype=np.float32).ravel().tolist()
        return self._query(vec, DENSE, limit, filter, with_vectors)

    def search_sparse(self, indices: list[int], values: list[float], limit: int = 10,
                      filter: dict | None = None) -> list[Hit]:
        if len(indices) == 0:
            return []
        sv = self.qe.SparseVector(indices=[int(i) for i in indices],
                                  values=[float(v) for v in values])
        return self._query(sv, SPARSE, limit, filter, False)

    def retrieve(self, ids: list[str], with_vectors: bool = True) -> list[Hit]:
        if self.shard is None or not ids:
            return []
        # Both flags are required by the binding (TypeError otherwise), though stubbed optional.
        recs = self.shard.retrieve([str(i) for i in ids], True, with_vectors)
        by_id = {str(r.id): self._hit(r, with_vectors) for r in recs}
        return [by_id[str(i)] for i in dict.fromkeys(ids) if str(i) in by_id]

    def scroll(self, filter: dict | None = None, with_vectors: bool = False,
               batch: int = 512) -> Iterator[Hit]:
        if self.shard is None:
            return
        qe, flt, offset = self.qe, self._filter(filter), None
        while True:
            recs, offset = self.shard.scroll(qe.ScrollRequest(
                offset=offset, limit=batch, filter=flt, with_payload=True,
                with_vector=with_vectors))
            for r in recs:
                yield self._hit(r, with_vectors)
            if offset is None or not recs:
                return

    def set_payload(self, updates: dict[str, dict]) -> None:
        qe, shard = self.qe, self._need()
        for fields, ids in _group_payloads(updates).values():
            for i in range(0, len(ids), 4096):
                try:
                    shard.update(qe.UpdateOperation.set_payload(ids[i:i + 4096], fields))
                except Exception as e:   # e.g. "No point with id ..."
                    raise StoreError(f"set_payload in {self.where} failed: {e}") from e

    def delete(self, ids: list[str] | None = None, filter: dict | None = None) -> int:
        if ids is None and not filter:
            raise StoreError("delete needs ids or a filter (refusing to delete everything)")
        if self.shard is None or (ids is not None and not ids):
            return 0
        flt = self._filter(filter, [str(i) for i in ids] if ids is not None else None)
        n = int(self.shard.count(self.qe.CountRequest(exact=True, filter=flt)))
        if n:
            self.shard.update(self.qe.UpdateOperation.delete_points_by_filter(flt))
        return n

    def get_doc(self, name: str) -> dict | None:
        return _read_json(self.dir / "docs" / f"{check_name(name, 'doc')}.json")

    def put_doc(self, name: str, doc: dict) -> None:
        if self.meta() is None:
            raise StoreError(f"{self.where} does not exist yet: call ensure() before put_doc()")
        _write_json(self.dir / "docs" / f"{check_name(name, 'doc')}.json", plain(doc))

    def collections(self) -> list[str]:
        return edge_collections(self.root)

    def optimize(self) -> None:
        if self.shard is not None:
            self.shard.optimize()

    def drop(self) -> None:
        # We hold the collection's lock, so no other phisearch process has the shard open.
        if self.shard is not None:
            self.shard.close()
            self.shard = None
        shutil.rmtree(self.dir, ignore_errors=True)
        self._dim = None

    def close(self) -> None:
        """Close the shard, then let go of the lock (in that order: see store_lock.py)."""
        try:
            if self.shard is not None:
                self.shard.close()
                self.shard = None
        finally:
            self.lock.release()


# -- Edge folder maintenance, done by whoever holds the collection's lock -------------------
# A snapshot restore swaps the collection folder for a staged one with two renames. It writes a
# journal first, so a process killed between the renames leaves a swap the next open finishes
# (the staged folder was checked to open before the journal was written) or undoes.

SNAPSHOT_DIR = ".snapshots"


def swap_journal(root: Path, name: str) -> Path:
    return Path(root) / f".swap-{name}.json"


def finish_swap(root: Path, name: str, interrupted: bool = True) -> str | None:
    """Complete or roll back an interrupted swap of collection `name`; returns what was done.
    The restore itself calls it too (interrupted=False) to drop the journal and the trash."""
    journal = swap_journal(root, name)
    job = _read_json(journal) if journal.exists() else None
    if job is None:
        return None
    live, staging, trash = Path(root) / name, Path(job["staging"]), Path(job["trash"])
    if not live.exists() and staging.exists():
        staging.rename(live)            # killed between the two renames: roll forward
        done = "finished"
    elif not live.exists() and trash.exists():
        trash.rename(live)              # the staged folder is gone: put the old one back
        done = "rolled back"
    elif staging.exists():
        done = "rolled back"            # killed before the live folder moved: drop the copy
    else:
        done = "completed"
    journal.unlink()
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    if interrupted:
        log.warning("an interrupted snapshot restore of %s was %s", name, done)
    return done


def clean_temporaries(root: Path, name: str) -> list[str]:
    """Remove what killed snapshot operations left for `name`: staged restores, trash folders
    and half-written archives. Only a holder of the lock writes these, so any left are stale."""
    root = Path(root)
    gone = [p for pat in (f".restore-{name}-*", f".trash-{name}-*") for p in root.glob(pat)]
    gone += list((root / SNAPSHOT_DIR / name).glob(".*.tar.gz.tmp"))
    for p in gone:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if gone:
        log.warning("removed %d stale temporaries of interrupted snapshot operations on %s",
                    len(gone), name)
    return [str(p) for p in gone]


def open_store(cfg: StoreConfig) -> Store:
    """The store named by cfg: a Qdrant server when url is set, else an Edge folder."""
    if cfg.url:
        from .store_server import ServerStore

        return ServerStore(cfg)
    if not cfg.path:
        raise StoreError("no store given: pass a store folder (--store) or a Qdrant URL "
                         "(--qdrant-url)")
    return EdgeStore(cfg)
