"""The Qdrant Edge backend: in-process, one shard folder per collection (edge_files.py has
the folder's layout). Edge allows one open handle per shard folder, and loading a shard that
another process is closing can lose its points (docs/upstream/edge-load-during-close.md), so
every open takes our lock (lock.py) first, waits for it up to `busy_wait` seconds and then
raises StoreBusy; the lock is released after close().
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from phisearch.indexer.store import edge_files as files
from phisearch.indexer.store.base import (
    DENSE,
    INDEXES,
    SPARSE,
    Backend,
    Hit,
    PointData,
    Store,
    StoreBusy,
    StoreConfig,
    StoreError,
    check_meta,
    check_name,
    dense_list,
    group_payloads,
    hit_of,
    parse_filter,
    plain,
    prepare_meta,
)
from phisearch.indexer.store.lock import CollectionLock, LockTimeout, describe

log = logging.getLogger(__name__)

CREATING = ".creating"   # in a collection folder while its shard is made, before meta.json


class EdgeStore(Store):
    """One collection of an Edge store folder, held open (and locked) until close()."""

    backend = "edge"

    def __init__(self, cfg: StoreConfig, name: str) -> None:
        import qdrant_edge as qe

        self.qe = qe
        self.cfg = cfg
        self.root = Path(cfg.path or "")
        self.name = name
        self.dir = self.root / self.name
        self.shard_dir = self.dir / "shard"
        self.meta_path = self.dir / "meta.json"   # written last: the collection exists
        self.shard = None
        self._dim: int | None = None
        # Every open takes our lock first and keeps it until close(): no phisearch process
        # ever calls EdgeShard.load on a shard another may hold (lock.py says why).
        self.lock = CollectionLock(self.root, self.name)
        try:
            self.lock.acquire(cfg.busy_wait, polite=cfg.yields)
        except LockTimeout as e:
            who = describe(e.holder)
            raise StoreBusy(f"{self.where} is in use by another process"
                            f"{f' ({who})' if who else ''} (e.g. a running idx build); retry "
                            "when it finishes") from None
        try:
            files.finish_swap(self.root, self.name)   # a restore killed mid-swap: finish/undo
            files.clean_temporaries(self.root, self.name)
            self._drop_half_created()
            if self.shard_dir.exists() and self.meta_path.is_file():
                self.shard = self._load()   # a collection not yet built is opened by ensure()
        except BaseException:
            self.lock.release()
            raise

    def _drop_half_created(self) -> None:
        """A create killed before meta.json leaves a shard folder that may not load (no
        segments yet, so no config to load it with). It cannot hold points (upserts come after
        meta.json), so the folder our marker names as ours is removed and ensure() starts
        again; a shard folder without our marker is not ours to delete (ensure() decides)."""
        marker = self.dir / CREATING
        if not marker.exists():
            return
        if not self.meta_path.exists():
            log.warning("%s: removing a shard whose creation was interrupted", self.where)
            shutil.rmtree(self.shard_dir, ignore_errors=True)
        else:   # killed between meta.json and the marker's removal: the collection is whole
            marker.unlink(missing_ok=True)

    @property
    def where(self) -> str:
        alias = f" (alias of {self.name})" if self.name != self.cfg.collection else ""
        return f"store {self.root} collection {self.cfg.collection}{alias}"

    @property
    def is_built(self) -> bool:
        return self.shard is not None

    def others_waiting(self) -> bool:
        return self.lock.others_waiting()

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

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Engine exceptions -> one-line StoreErrors, for reads as for writes."""
        try:
            yield
        except StoreError:
            raise
        except Exception as e:
            raise StoreError(f"{what} in {self.where} failed: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e

    def _need(self):
        if self.shard is None:
            raise StoreError(f"{self.where} does not exist yet (run idx build first)")
        return self.shard

    def meta(self) -> dict | None:
        return files.read_json(self.meta_path) if self.shard_dir.exists() else None

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
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / CREATING).touch()   # until meta.json: see _drop_half_created
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
        files.write_json(self.meta_path, meta)   # last: the collection now exists
        (self.dir / CREATING).unlink(missing_ok=True)
        self._dim = meta["dim"]

    def claim_write(self) -> None:
        """Nothing to take: the collection's lock was taken at open (one handle, any use)."""

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
            with self._errors("upsert"):
                shard.update(qe.UpdateOperation.upsert_points(batch))

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
        flt = self._filter(filter)
        with self._errors("count"):
            return int(self.shard.count(self.qe.CountRequest(exact=True, filter=flt)))

    def _query(self, vec: Any, using: str, limit: int, filter: dict | None,
               with_vectors: bool, score: str) -> list[Hit]:
        if self.shard is None:
            return []
        qe = self.qe
        req = qe.QueryRequest(limit=limit, query=qe.Query.Nearest(vec, using=using),
                              filter=self._filter(filter), with_payload=True,
                              with_vector=with_vectors)
        with self._errors("search"):
            found = self.shard.query(req)
        return [hit_of(p, with_vectors, score) for p in found]

    def _sparse(self, indices: list[int], values: list[float]) -> Any:
        return self.qe.SparseVector(indices=indices, values=values)

    def retrieve(self, ids: list[str], with_vectors: bool = True) -> list[Hit]:
        if self.shard is None or not ids:
            return []
        # Both flags are required by the binding (TypeError otherwise), though stubbed optional.
        with self._errors("retrieve"):
            recs = self.shard.retrieve([str(i) for i in ids], True, with_vectors)
        by_id = {str(r.id): hit_of(r, with_vectors) for r in recs}
        return [by_id[str(i)] for i in dict.fromkeys(ids) if str(i) in by_id]

    def scroll(self, filter: dict | None = None, with_vectors: bool = False,
               batch: int = 512) -> Iterator[Hit]:
        if self.shard is None:
            return
        qe, flt, offset = self.qe, self._filter(filter), None
        while True:
            with self._errors("scroll"):
                recs, offset = self.shard.scroll(qe.ScrollRequest(
                    offset=offset, limit=batch, filter=flt, with_payload=True,
                    with_vector=with_vectors))
            for r in recs:
                yield hit_of(r, with_vectors)
            if offset is None or not recs:
                return

    def set_payload(self, updates: dict[str, dict]) -> None:
        qe, shard = self.qe, self._need()
        for fields, ids in group_payloads(updates).values():
            for i in range(0, len(ids), 4096):
                with self._errors("set_payload"):   # e.g. "No point with id ..."
                    shard.update(qe.UpdateOperation.set_payload(ids[i:i + 4096], fields))

    def delete(self, ids: list[str] | None = None, filter: dict | None = None) -> int:
        if ids is None and not filter:
            raise StoreError("delete needs ids or a filter (refusing to delete everything)")
        if self.shard is None or (ids is not None and not ids):
            return 0
        flt = self._filter(filter, [str(i) for i in ids] if ids is not None else None)
        with self._errors("delete"):
            n = int(self.shard.count(self.qe.CountRequest(exact=True, filter=flt)))
            if n:
                self.shard.update(self.qe.UpdateOperation.delete_points_by_filter(flt))
        return n

    def get_doc(self, name: str) -> dict | None:
        return files.read_json(self.dir / "docs" / f"{check_name(name, 'doc')}.json")

    def put_doc(self, name: str, doc: dict) -> None:
        if self.meta() is None:
            raise StoreError(f"{self.where} does not exist yet: call ensure() before put_doc()")
        files.write_json(self.dir / "docs" / f"{check_name(name, 'doc')}.json", plain(doc))

    names_snapshots = True

    def snapshot(self, name: str | None = None) -> dict:
        """Archive the collection while we hold its only handle (flushed first): no build can
        write during the copy. `name`: the archive's name (default: collection-UTC time)."""
        if self.meta() is None:
            raise StoreError(f"no collection in {self.where}: nothing to snapshot")
        with self._errors("flush"):
            self._need().flush()
        return files.write_archive(self.root, self.name, self.count(),
                                   (self.meta() or {}).get("model_sha256"), name)

    def restore(self, name: str) -> dict:
        """Unpack into a staging folder, check that its shard opens, then swap folders with a
        journaled pair of renames while holding the lock (edge_files.swap_in)."""
        staging = files.stage_archive(self.root, self.name, name)
        try:
            with self._errors("open the snapshot"):
                probe = self.qe.EdgeShard.load(str(staging / "shard"))   # private: no lock
                points = int(probe.count(self.qe.CountRequest(exact=True)))
                probe.close()
            if self.shard is not None:
                self.shard.close()
                self.shard = None
            files.swap_in(self.root, self.name, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            self.close()
        return {"name": name, "collection": self.name, "points": points}

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


class EdgeBackend(Backend):
    """An Edge store folder: its collections, aliases (aliases.json) and snapshots."""

    kind = "edge"
    shares_handles = False

    def __init__(self, cfg: StoreConfig) -> None:
        if not cfg.path:
            raise StoreError("no store given: pass a store folder (--store) or a Qdrant URL "
                             "(--qdrant-url)")
        self.cfg = cfg
        self.root = Path(cfg.path)

    @property
    def where(self) -> str:
        return f"store {self.root}"

    def open(self, collection: str | None = None) -> EdgeStore:
        name = check_name(collection or self.cfg.collection, "collection")
        return EdgeStore(self.cfg, files.resolve(self.root, name))

    def collections(self) -> list[str]:
        return files.collections(self.root)

    def metas(self) -> dict[str, dict]:
        return {n: files.read_json(self.root / n / "meta.json") or {} for n in self.collections()}

    def aliases(self) -> dict[str, str]:
        return files.aliases(self.root)

    def set_alias(self, alias: str, target: str) -> str | None:
        self.check_alias(alias, target)
        table = files.aliases(self.root)
        previous = table.get(alias)
        table[alias] = target
        files.write_json(self.root / files.ALIASES_FILE, table)   # one atomic replace
        return previous

    def delete_alias(self, alias: str) -> str:
        table = files.aliases(self.root)
        if alias not in table:
            raise StoreError(f"no alias {alias} in {self.where}")
        target = table.pop(alias)
        files.write_json(self.root / files.ALIASES_FILE, table)
        return target

    def snapshots(self, collection: str) -> list[dict]:
        return files.list_archives(self.root, files.resolve(self.root, collection))
