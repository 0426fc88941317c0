"""The Qdrant server backend of the store (qdrant-client against a URL; never its local mode).

Metadata and documents live in a companion collection `<collection>__phisearch_meta` (a 1-d
dummy vector; one point per record, id uuid5 of its name, the record as JSON text in the
payload), so they are never points of the main collection. Server Euclid scores are true
distances (Qdrant's Euclid post-processing takes the square root, as Edge's does), so `score`
means the same in both backends; the shared test suite checks it against numpy.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from .store import (
    DENSE,
    INDEXES,
    NAMESPACE,
    SPARSE,
    Hit,
    PointData,
    Store,
    StoreConfig,
    StoreError,
    _group_payloads,
    check_meta,
    check_name,
    dense_list,
    parse_filter,
    plain,
    prepare_meta,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
META_SUFFIX = "__phisearch_meta"
RETRIES, BACKOFF = 5, 0.5


def _is_connection_error(e: BaseException) -> bool:
    """Errors worth a retry: the server was unreachable, not a refused request."""
    if isinstance(e, (ResponseHandlingException, ConnectionError, TimeoutError)):
        return True
    try:
        import grpc
    except ImportError:
        return False
    return isinstance(e, grpc.RpcError) and e.code() in (
        grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _short(e: BaseException) -> str:
    """One line: gRPC errors carry theirs in details(), others in their first line."""
    details = getattr(e, "details", None)
    text = details() if callable(details) else str(e)
    return (text or type(e).__name__).splitlines()[0]


def _doc_id(name: str) -> str:
    return str(uuid.uuid5(NAMESPACE, f"doc/{name}"))


META_ID = str(uuid.uuid5(NAMESPACE, "meta"))


class ServerStore(Store):
    """A collection on a Qdrant server, plus its companion metadata collection."""

    backend = "server"

    def __init__(self, cfg: StoreConfig) -> None:
        self.cfg = cfg
        self.name = check_name(cfg.collection, "collection")
        self.meta_name = self.name + META_SUFFIX
        self.client = QdrantClient(url=cfg.url, api_key=cfg.api_key, prefer_grpc=cfg.prefer_grpc,
                                   timeout=max(1, int(cfg.timeout)),
                                   check_compatibility=False)
        with self._errors("connect"):   # fail here, clearly, rather than mid-command
            self.client.get_collections()
            # An alias resolves once, at open: the companion metadata follows the real name.
            aliases = {a.alias_name: a.collection_name
                       for a in self.client.get_aliases().aliases}
        if self.name in aliases:
            self.name = aliases[self.name]
            self.meta_name = self.name + META_SUFFIX
        self._dim: int | None = None

    @property
    def where(self) -> str:
        return f"Qdrant at {self.cfg.url} collection {self.name}"

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Client exceptions -> one-line StoreErrors."""
        try:
            yield
        except StoreError:
            raise
        except UnexpectedResponse as e:
            hint = " (check --api-key / QDRANT_API_KEY)" if e.status_code in (401, 403) else ""
            body = e.content.decode(errors="replace") if e.content else ""
            if body.lstrip().startswith("<") or "html" in body[:200].lower():
                raise StoreError(f"{self.cfg.url} answered {what} with an HTML page (HTTP "
                                 f"{e.status_code} {e.reason_phrase}): not a Qdrant server? "
                                 "check --qdrant-url") from None
            detail = " ".join(body.split())[:200] if body else e.reason_phrase
            raise StoreError(f"Qdrant at {self.cfg.url} refused {what}: HTTP {e.status_code} "
                             f"{detail}{hint}") from None
        except Exception as e:
            if _is_connection_error(e):
                raise StoreError(f"cannot reach Qdrant at {self.cfg.url}: {_short(e)}") from None
            raise StoreError(f"{what} on {self.where} failed: {e}") from e

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        """Retry connection errors with exponential backoff: a long build survives a blip."""
        delay = BACKOFF
        for attempt in range(1, RETRIES + 1):
            try:
                return fn()
            except Exception as e:
                if not _is_connection_error(e) or attempt == RETRIES:
                    with self._errors(what):
                        raise
                log.warning("%s on %s failed (%s); retry %d/%d in %.1f s", what, self.where,
                            type(e).__name__, attempt, RETRIES - 1, delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    # -- metadata and documents -------------------------------------------------------------
    def _exists(self, name: str) -> bool:
        with self._errors("collection_exists"):
            return self.client.collection_exists(name)

    def _get_record(self, pid: str) -> dict | None:
        if not self._exists(self.meta_name):
            return None
        with self._errors("read metadata"):
            recs = self.client.retrieve(self.meta_name, [pid], with_payload=True,
                                        with_vectors=False)
        return json.loads(recs[0].payload["json"]) if recs else None

    def _put_record(self, pid: str, name: str, doc: dict) -> None:
        point = models.PointStruct(id=pid, vector=[1.0],
                                   payload={"name": name, "json": json.dumps(plain(doc))})
        self._retry("write metadata", lambda: self.client.upsert(
            self.meta_name, [point], wait=True))

    def meta(self) -> dict | None:
        if not self._exists(self.name):
            return None
        return self._get_record(META_ID)

    def ensure(self, meta: dict) -> None:
        meta = prepare_meta(meta)
        stored = self.meta()
        if stored is not None:
            check_meta(stored, meta, self.where)
            self._dim = stored["dim"]
            return
        with self._errors("create collection"):
            if not self._exists(self.name):
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
            if not self._exists(self.meta_name):
                self.client.create_collection(self.meta_name, vectors_config=models.VectorParams(
                    size=1, distance=models.Distance.DOT))
        self._put_record(META_ID, "__meta__", meta)   # last: the collection now exists
        self._dim = meta["dim"]

    def get_doc(self, name: str) -> dict | None:
        return self._get_record(_doc_id(check_name(name, "doc")))

    def put_doc(self, name: str, doc: dict) -> None:
        if self.meta() is None:
            raise StoreError(f"{self.where} does not exist yet: call ensure() before put_doc()")
        self._put_record(_doc_id(check_name(name, "doc")), name, doc)

    def collections(self) -> list[str]:
        with self._errors("list collections"):
            names = {c.name for c in self.client.get_collections().collections}
        return sorted(n for n in names if not n.endswith(META_SUFFIX) and n + META_SUFFIX in names)

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

    def upsert(self, points: list[PointData]) -> None:
        self._need()
        for i in range(0, len(points), 256):
            batch = [models.PointStruct(id=p.id, payload=plain(p.payload), vector={
                DENSE: dense_list(p, self._dim),
                SPARSE: models.SparseVector(indices=[int(j) for j in p.sparse_indices],
                                            values=[float(x) for x in p.sparse_values])})
                for p in points[i:i + 256]]
            self._retry("upsert", lambda b=batch: self.client.upsert(self.name, b, wait=True))

    def count(self, filter: dict | None = None) -> int:
        if not self._exists(self.name):
            return 0
        with self._errors("count"):
            return int(self.client.count(self.name, count_filter=self._filter(filter),
                                         exact=True).count)

    @staticmethod
    def _hit(p: Any, with_vectors: bool) -> Hit:
        hit = Hit(id=str(p.id), score=float(getattr(p, "score", 0.0) or 0.0),
                  payload=dict(p.payload or {}))
        if with_vectors and isinstance(p.vector, dict):
            if DENSE in p.vector:
                hit.vector = np.asarray(p.vector[DENSE], dtype=np.float32)
            sp = p.vector.get(SPARSE)
            hit.sparse = (list(sp.indices), list(sp.values)) if sp is not None else ([], [])
        return hit

    def _query(self, query: Any, using: str, limit: int, filter: dict | None,
               with_vectors: bool) -> list[Hit]:
        if not self._exists(self.name):
            return []
        with self._errors("search"):
            res = self.client.query_points(self.name, query=query, using=using, limit=limit,
                                           query_filter=self._filter(filter), with_payload=True,
                                           with_vectors=with_vectors)
        # Euclid scores come back as distances already (sqrt applied server-side).
        return [self._hit(p, with_vectors) for p in res.points]

    def search(self, vector: np.ndarray, limit: int = 10, filter: dict | None = None,
               with_vectors: bool = False) -> list[Hit]:
        vec = np.asarray(vector, dtype=np.float32).ravel().tolist()
        return self._query(vec, DENSE, limit, filter, with_vectors)

    def search_sparse(self, indices: list[int], values: list[float], limit: int = 10,
                      filter: dict | None = None) -> list[Hit]:
        if len(indices) == 0:
            return []
        sv = models.SparseVector(indices=[int(i) for i in indices], values=[float(v) for v in values])
        return self._query(sv, SPARSE, limit, filter, False)

    def retrieve(self, ids: list[str], with_vectors: bool = True) -> list[Hit]:
        if not ids or not self._exists(self.name):
            return []
        with self._errors("retrieve"):
            recs = self.client.retrieve(self.name, [str(i) for i in ids], with_payload=True,
                                        with_vectors=with_vectors)
        by_id = {str(r.id): self._hit(r, with_vectors) for r in recs}
        return [by_id[str(i)] for i in dict.fromkeys(ids) if str(i) in by_id]

    def scroll(self, filter: dict | None = None, with_vectors: bool = False,
               batch: int = 512) -> Iterator[Hit]:
        if not self._exists(self.name):
            return
        flt, offset = self._filter(filter), None
        while True:
            with self._errors("scroll"):
                recs, offset = self.client.scroll(self.name, scroll_filter=flt, limit=batch,
                                                  offset=offset, with_payload=True,
                                                  with_vectors=with_vectors)
            for r in recs:
                yield self._hit(r, with_vectors)
            if offset is None or not recs:
                return

    def set_payload(self, updates: dict[str, dict]) -> None:
        self._need()
        ops = [models.SetPayloadOperation(set_payload=models.SetPayload(payload=fields,
                                                                        points=ids[i:i + 4096]))
               for fields, ids in _group_payloads(updates).values()
               for i in range(0, len(ids), 4096)]
        for i in range(0, len(ops), 256):
            self._retry("set_payload", lambda b=ops[i:i + 256]: self.client.batch_update_points(
                self.name, b, wait=True))

    def delete(self, ids: list[str] | None = None, filter: dict | None = None) -> int:
        if ids is None and not filter:
            raise StoreError("delete needs ids or a filter (refusing to delete everything)")
        if (ids is not None and not ids) or not self._exists(self.name):
            return 0
        flt = self._filter(filter, [str(i) for i in ids] if ids is not None else None)
        with self._errors("delete"):
            n = int(self.client.count(self.name, count_filter=flt, exact=True).count)
            if n:
                self.client.delete(self.name, points_selector=models.FilterSelector(filter=flt),
                                   wait=True)
        return n

    def drop(self) -> None:
        with self._errors("delete collection"):
            for name in (self.name, self.meta_name):
                if self.client.collection_exists(name):
                    self.client.delete_collection(name)
        self._dim = None

    def close(self) -> None:
        with self._errors("close"):
            self.client.close()
