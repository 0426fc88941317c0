"""The Qdrant server backend of the store (qdrant-client against a URL). Its local mode is no
backend of phisearch's; the contract tests inject it (TEST_CLIENTS) to run these calls against
Qdrant's own implementation of the API, and a real server in CI (docs/operations.md).

Metadata and documents live in a companion collection `<collection>__phisearch_meta` (a 1-d
dummy vector; one point per record, id uuid5 of its name, the record as JSON text in the
payload), so they are never points of the main collection; the write lease lives there too
(lease.py: one writer at a time, as Edge's lock gives; readers never wait). Server Euclid
scores are true distances (Qdrant's Euclid post-processing takes the square root, as Edge's
does), so `score` means the same in both backends; the shared test suite checks it against
numpy.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from phisearch.indexer.store.base import (
    DENSE,
    INDEXES,
    NAMESPACE,
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
from phisearch.indexer.store.lease import TTL, LeaseBusy, WriteLease, describe
from phisearch.indexer.store.server_errors import Missing, errors, is_connection_error
from phisearch.indexer.store.server_snapshots import companion, recover
from qdrant_client import QdrantClient, models
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
META_SUFFIX = "__phisearch_meta"
RETRIES, BACKOFF = 5, 0.5
# Tests only: location (URL) -> a client to use instead of connecting to it, never closed by the
# store. tests/conftest.py puts qdrant-client's local mode here (QdrantClient(":memory:")) so the
# same calls run against Qdrant's own implementation of the API without a server. Nothing in
# phisearch fills it: no flag, URL scheme or environment variable reaches local mode.
TEST_CLIENTS: dict[str, QdrantClient] = {}


def _doc_id(name: str) -> str:
    return str(uuid.uuid5(NAMESPACE, f"doc/{name}"))


META_ID = str(uuid.uuid5(NAMESPACE, "meta"))


class ServerStore(Store):
    """A collection on a Qdrant server, plus its companion metadata collection."""

    backend = "server"

    def __init__(self, cfg: StoreConfig, client: QdrantClient, name: str,
                 owns_client: bool = True) -> None:
        self.cfg = cfg
        self.client = client
        self.owns_client = owns_client    # False: an injected client, its owner closes it
        self.name = name                  # an alias was resolved at open, by the backend
        self.meta_name = self.name + META_SUFFIX
        self._dim: int | None = None
        self.lease = WriteLease(client, self.meta_name, self._retry)

    @property
    def where(self) -> str:
        return f"Qdrant at {self.cfg.url} collection {self.name}"

    def _errors(self, what: str) -> AbstractContextManager[None]:
        """Client exceptions -> one-line StoreErrors (Missing: no such collection)."""
        return errors(self.cfg.url, self.where, what)

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        """Retry connection errors with exponential backoff (tenacity): a long build survives
        a blip; a refused request fails at once."""
        def warn(state: RetryCallState) -> None:
            log.warning("%s on %s failed (%s); retry %d/%d", what, self.where,
                        type(state.outcome.exception()).__name__, state.attempt_number,
                        RETRIES - 1)

        retrying = Retrying(stop=stop_after_attempt(RETRIES), reraise=True,
                            wait=wait_exponential(multiplier=BACKOFF, max=30),
                            retry=retry_if_exception(is_connection_error), before_sleep=warn,
                            sleep=time.sleep)
        with self._errors(what):
            return retrying(fn)

    # -- the write lease (lease.py) -------------------------------------------------------------
    def _writing(self) -> None:
        """Before any write: hold the lease (waiting up to busy_wait for another writer, then
        StoreBusy), and never write once it was lost."""
        if not self.lease.held:
            try:
                self.lease.acquire(self.cfg.busy_wait)
            except LeaseBusy as e:
                raise StoreBusy(f"{self.where} is in use by another process "
                                f"({describe(e.holder)}) (e.g. a running idx build); retry when "
                                f"it finishes (a writer that died frees it {TTL:.0f} s after its "
                                "last renewal)") from None
        lost = self.lease.check()
        if lost:
            raise StoreError(f"{self.where}: stopped writing, {lost}; another writer may be "
                             "using the collection (rerun to resume when it is done)")

    def _companion(self) -> None:
        """Create the metadata collection if missing (two writers may race to: fine), never
        beside a collection with points that is not phisearch's."""
        with self._errors("create collection"):
            if self.client.collection_exists(self.meta_name):
                return
            if self.client.collection_exists(self.name) and self.count() > 0:
                raise StoreError(f"{self.where} holds points but no phisearch metadata; not a "
                                 "phisearch collection? delete it to rebuild")
            try:
                self.client.create_collection(self.meta_name, vectors_config=models.VectorParams(
                    size=1, distance=models.Distance.DOT))
            except Exception:
                if not self.client.collection_exists(self.meta_name):
                    raise

    # -- metadata and documents -------------------------------------------------------------
    def _get_record(self, pid: str) -> dict | None:
        try:
            with self._errors("read metadata"):
                recs = self.client.retrieve(self.meta_name, [pid], with_payload=True,
                                            with_vectors=False)
        except Missing:
            return None
        return json.loads(recs[0].payload["json"]) if recs else None

    def _put_record(self, pid: str, name: str, doc: dict) -> None:
        point = models.PointStruct(id=pid, vector=[1.0],
                                   payload={"name": name, "json": json.dumps(plain(doc))})
        self._retry("write metadata", lambda: self.client.upsert(
            self.meta_name, [point], wait=True))

    def meta(self) -> dict | None:
        return self._get_record(META_ID)

    def ensure(self, meta: dict) -> None:
        """Write commands start here: the write lease is taken first and held until close()."""
        meta = prepare_meta(meta)
        took = not self.lease.held
        self._companion()   # the lease lives there
        self._writing()
        try:
            self._ensure(meta)
        except BaseException:
            if took:
                self.lease.release()
            raise

    def _ensure(self, meta: dict) -> None:
        stored = self.meta()
        if stored is not None:
            check_meta(stored, meta, self.where)
            self._dim = stored["dim"]
            return
        with self._errors("create collection"):
            if not self.client.collection_exists(self.name):
                log.info("creating %s (dim %d)", self.where, meta["dim"])
                self.client.create_collection(
                    self.name,
                    vectors_config={DENSE: models.VectorParams(size=meta["dim"],
                                                               distance=models.Distance.EUCLID)},
                    sparse_vectors_config={SPARSE: models.SparseVectorParams()})
            elif self.count() > 0:
                raise StoreError(f"{self.where} holds points but no phisearch metadata; not a "
                                 "phisearch collection? delete it to rebuild")
            for field, kind in INDEXES.items():
                schema = models.PayloadSchemaType.INTEGER if kind == "integer" else \
                    models.PayloadSchemaType.KEYWORD
                self.client.create_payload_index(self.name, field, field_schema=schema, wait=True)
        self._put_record(META_ID, "__meta__", meta)   # last: the collection now exists
        self._dim = meta["dim"]

    def get_doc(self, name: str) -> dict | None:
        return self._get_record(_doc_id(check_name(name, "doc")))

    def put_doc(self, name: str, doc: dict) -> None:
        if self.meta() is None:
            raise StoreError(f"{self.where} does not exist yet: call ensure() before put_doc()")
        self._writing()
        self._put_record(_doc_id(check_name(name, "doc")), name, doc)

    # -- points -------------------------------------------------------------------------------
    def _filter(self, filter: dict | None, ids: list[str] | None = None) -> models.Filter | None:
        """The one translation of a plain-dict filter into a qdrant-client Filter."""
        must: list[Any] = []
        for c in parse_filter(filter):
            if c.kind == "value":
                must.append(models.FieldCondition(key=c.key, match=models.MatchValue(value=c.value)))
            elif c.kind == "any":
                must.append(models.FieldCondition(key=c.key, match=models.MatchAny(any=c.value)))
            elif c.kind == "range":
                must.append(models.FieldCondition(key=c.key, range=models.Range(**c.value)))
            else:
                must.append(models.IsNullCondition(is_null=models.PayloadField(key=c.key)))
        if ids is not None:
            must.append(models.HasIdCondition(has_id=list(ids)))
        return models.Filter(must=must) if must else None

    def _need(self) -> None:
        if self._dim is None:
            m = self.meta()
            if m is None:
                raise StoreError(f"{self.where} does not exist yet (run idx build first)")
            self._dim = m["dim"]

    def claim_write(self) -> None:
        """The write lease now, as the first write would take it (never creates anything)."""
        self._need()
        self._writing()

    def upsert(self, points: list[PointData]) -> None:
        self.claim_write()
        for i in range(0, len(points), 256):
            batch = [models.PointStruct(id=p.id, payload=plain(p.payload), vector={
                DENSE: dense_list(p, self._dim),
                SPARSE: models.SparseVector(indices=[int(j) for j in p.sparse_indices],
                                            values=[float(x) for x in p.sparse_values])})
                for p in points[i:i + 256]]
            self._retry("upsert", lambda b=batch: self.client.upsert(self.name, b, wait=True))

    def count(self, filter: dict | None = None) -> int:
        try:
            with self._errors("count"):
                return int(self.client.count(self.name, count_filter=self._filter(filter),
                                             exact=True).count)
        except Missing:
            return 0

    def _query(self, query: Any, using: str, limit: int, filter: dict | None,
               with_vectors: bool, score: str) -> list[Hit]:
        try:
            with self._errors("search"):
                res = self.client.query_points(self.name, query=query, using=using, limit=limit,
                                               query_filter=self._filter(filter),
                                               with_payload=True, with_vectors=with_vectors)
        except Missing:
            return []
        # Euclid scores come back as distances already (sqrt applied server-side).
        return [hit_of(p, with_vectors, score) for p in res.points]

    def _sparse(self, indices: list[int], values: list[float]) -> Any:
        return models.SparseVector(indices=indices, values=values)

    def retrieve(self, ids: list[str], with_vectors: bool = True) -> list[Hit]:
        if not ids:
            return []
        try:
            with self._errors("retrieve"):
                recs = self.client.retrieve(self.name, [str(i) for i in ids], with_payload=True,
                                            with_vectors=with_vectors)
        except Missing:
            return []
        by_id = {str(r.id): hit_of(r, with_vectors) for r in recs}
        return [by_id[str(i)] for i in dict.fromkeys(ids) if str(i) in by_id]

    def scroll(self, filter: dict | None = None, with_vectors: bool = False,
               batch: int = 512) -> Iterator[Hit]:
        flt, offset = self._filter(filter), None
        while True:
            try:
                with self._errors("scroll"):
                    recs, offset = self.client.scroll(self.name, scroll_filter=flt, limit=batch,
                                                      offset=offset, with_payload=True,
                                                      with_vectors=with_vectors)
            except Missing:
                return
            for r in recs:
                yield hit_of(r, with_vectors)
            if offset is None or not recs:
                return

    def set_payload(self, updates: dict[str, dict]) -> None:
        self.claim_write()
        ops = [models.SetPayloadOperation(set_payload=models.SetPayload(payload=fields,
                                                                        points=ids[i:i + 4096]))
               for fields, ids in group_payloads(updates).values()
               for i in range(0, len(ids), 4096)]
        for i in range(0, len(ops), 256):
            self._retry("set_payload", lambda b=ops[i:i + 256]: self.client.batch_update_points(
                self.name, b, wait=True))

    def delete(self, ids: list[str] | None = None, filter: dict | None = None) -> int:
        if ids is None and not filter:
            raise StoreError("delete needs ids or a filter (refusing to delete everything)")
        if ids is not None and not ids:
            return 0
        flt = self._filter(filter, [str(i) for i in ids] if ids is not None else None)
        try:
            self._writing()   # a collection that does not exist: Missing, nothing to delete
            with self._errors("delete"):
                n = int(self.client.count(self.name, count_filter=flt, exact=True).count)
                if n:
                    self.client.delete(self.name, wait=True,
                                       points_selector=models.FilterSelector(filter=flt))
        except Missing:
            return 0
        return n

    def drop(self) -> None:
        with self._errors("delete collection"):
            for name in (self.name, self.meta_name):
                if self.client.collection_exists(name):
                    self.client.delete_collection(name)
        self._dim = None
        self.lease.forget()   # it went with the companion

    def close(self) -> None:
        self.lease.release()
        if self.owns_client:
            with self._errors("close"):
                self.client.close()

    # -- snapshots: Qdrant's own API, for the collection and its companion --------------------
    def snapshot(self) -> dict:
        with self._errors("create snapshot"):
            main = self.client.create_snapshot(self.name, wait=True)
            self.client.create_snapshot(self.meta_name, wait=True)
        return {"name": main.name, "collection": self.name, "points": self.count(),
                "created_at": time.time(), "bytes": main.size}

    def restore(self, name: str) -> dict:
        """Recover both collections from the snapshot files, through the API alone
        (server_snapshots.py), holding the write lease first while the collection is there (as
        a build would). The metadata snapshot taken with `name` is the first one of the
        companion created at or after it."""
        with self._errors("check the collection"):
            live = self.client.collection_exists(self.meta_name)
        if live:   # a running build (or cluster, remove) holds it: StoreBusy, nothing replaced
            self._writing()
        with self._errors("list snapshots"):
            main = {s.name: s for s in self.client.list_snapshots(self.name)}
            metas = self.client.list_snapshots(self.meta_name)
        if name not in main:
            raise StoreError(f"no snapshot {name} of {self.where}")
        meta = companion(main[name], metas)
        recover(self.client, self.cfg, self.where, [(self.name, main[name])] +
                ([(self.meta_name, meta)] if meta is not None else []))
        self.lease.forget()   # the companion (and any lease in it) is the snapshot's now
        return {"name": name, "collection": self.name, "points": self.count()}


class ServerBackend(Backend):
    """A Qdrant server: one thread-safe client for every collection and operation."""

    kind = "server"
    shares_handles = True

    def __init__(self, cfg: StoreConfig, client: QdrantClient | None = None) -> None:
        """`client`: tests only, an already-made client to use instead of connecting (it is
        never closed here); without one, TEST_CLIENTS is consulted, then cfg.url connected to."""
        self.cfg = cfg
        given = client if client is not None else TEST_CLIENTS.get(cfg.location)
        self.owns_client = given is None
        self.client = given if given is not None else QdrantClient(
            url=cfg.url, api_key=cfg.api_key, prefer_grpc=cfg.prefer_grpc,
            timeout=max(1, int(cfg.timeout)), check_compatibility=False)
        self._probe = self._store("-")   # its error mapping, no collection
        with self._probe._errors("connect"):   # fail here, clearly, rather than mid-command
            self.client.get_collections()

    @property
    def where(self) -> str:
        return f"Qdrant at {self.cfg.url}"

    def open(self, collection: str | None = None) -> ServerStore:
        name = check_name(collection or self.cfg.collection, "collection")
        # An alias resolves once, at open: the companion metadata follows the real name.
        return self._store(self.aliases().get(name, name))

    def _store(self, name: str) -> ServerStore:
        return ServerStore(self.cfg, self.client, name, owns_client=self.owns_client)

    def collections(self) -> list[str]:
        with self._probe._errors("list collections"):
            names = {c.name for c in self.client.get_collections().collections}
        return sorted(n for n in names if not n.endswith(META_SUFFIX) and n + META_SUFFIX in names)

    def metas(self) -> dict[str, dict]:
        return {n: self._store(n).meta() or {} for n in self.collections()}

    def aliases(self) -> dict[str, str]:
        with self._probe._errors("list aliases"):
            res = self.client.get_aliases()
        return {a.alias_name: a.collection_name for a in res.aliases}

    def set_alias(self, alias: str, target: str) -> str | None:
        self.check_alias(alias, target)
        previous = self.aliases().get(alias)
        ops: list = []
        if previous is not None:
            ops.append(models.DeleteAliasOperation(
                delete_alias=models.DeleteAlias(alias_name=alias)))
        ops.append(models.CreateAliasOperation(create_alias=models.CreateAlias(
            collection_name=target, alias_name=alias)))
        with self._probe._errors("update aliases"):   # one call: the switch is atomic
            self.client.update_collection_aliases(change_aliases_operations=ops)
        return previous

    def delete_alias(self, alias: str) -> str:
        target = self.aliases().get(alias)
        if target is None:
            raise StoreError(f"no alias {alias} at {self.cfg.url}")
        with self._probe._errors("delete alias"):
            self.client.update_collection_aliases(change_aliases_operations=[
                models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias))])
        return target

    def close(self) -> None:
        if self.owns_client:
            self.client.close()

    def snapshots(self, collection: str) -> list[dict]:
        name = self.aliases().get(collection, collection)
        with self._probe._errors("list snapshots"):
            snaps = self.client.list_snapshots(name)
        return sorted(({"name": s.name, "created_at": s.creation_time, "bytes": s.size,
                        "collection": name} for s in snaps), key=lambda i: i["created_at"] or "")
