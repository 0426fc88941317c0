"""`idx export`: copy a collection (typically an Edge folder) into another store (a Qdrant
server, or another Edge folder), resumably.

The destination gets the same schema (dest.ensure(source.meta()), so a destination built with
another model, readout or φ settings is refused with MetaMismatch), the same point ids, dense and
sparse vectors and payloads, and then the side documents. Resume needs no cursor: the source is
scrolled page by page in id order and every page first asks the destination which of its ids it
already holds with an equal payload; those are skipped, the rest upserted (idempotent: same id,
same point). A payload differs whenever the point does (a changed image changes `thumb` and
`phi_norm`; a re-clustering changes `cluster_id`), so a re-run also brings a stale copy up to date.
The side documents are copied last, so an interrupted export never leaves a "shards" resume
record in the destination that claims points it does not yet hold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from phisearch.indexer.store import (
    CLUSTERS_DOC,
    IDENTITY_KEYS,
    LAST_RUN_DOC,
    SHARDS_DOC,
    Hit,
    PointData,
    Store,
    StoreConfig,
    StoreError,
    open_store,
)

log = logging.getLogger(__name__)

EXPORT_DOC = "export"   # in the destination: where it came from, and how far the copy got
# The side documents every collection can hold: the store's own names for them (cluster.DOC is
# CLUSTERS_DOC), imported from the store, which needs no torch, so neither does export (a test
# checks both). Folder sources add the "folders" registry and one doc per folder (_copy_docs).
SIDE_DOCS = (SHARDS_DOC, LAST_RUN_DOC, CLUSTERS_DOC)


@dataclass(frozen=True)
class ExportConfig:
    source: StoreConfig
    dest: StoreConfig
    batch_size: int = 256           # points per page: one scroll page, one retrieve, one upsert
    limit: int | None = None        # stop after writing this many points (a trial; rerun resumes)


def meta_sha256(meta: dict) -> str:
    """Hash of a collection's identity (model, readout, φ settings, schema, dim)."""
    ident = {k: meta.get(k) for k in IDENTITY_KEYS}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def describe(cfg: StoreConfig) -> str:
    """The store in one line, for messages and the export doc."""
    return f"{cfg.location} collection {cfg.collection}"


def _same_store(a: StoreConfig, b: StoreConfig) -> bool:
    return a.collection == b.collection and a.location == b.location


def _pages(hits: Iterable[Hit], size: int) -> Iterator[list[Hit]]:
    page: list[Hit] = []
    for h in hits:
        page.append(h)
        if len(page) == size:
            yield page
            page = []
    if page:
        yield page


def to_point(h: Hit) -> PointData:
    """A scrolled record (with vectors) back into what upsert takes."""
    if h.vector is None:
        raise StoreError(f"point {h.id} has no dense vector {h.payload.get('key', '')!r}")
    idx, vals = h.sparse if h.sparse is not None else ([], [])
    return PointData(id=h.id, vector=h.vector, sparse_indices=list(idx),
                     sparse_values=list(vals), payload=h.payload)


def export(cfg: ExportConfig, on_progress: Callable[[dict], None] | None = None) -> dict:
    """Copy cfg.source into cfg.dest. Returns the summary (`idx export --json`); `complete` is
    False when `limit` stopped it early (rerun to continue)."""
    if _same_store(cfg.source, cfg.dest):
        raise StoreError(f"source and destination are the same ({describe(cfg.source)})")
    t0 = time.perf_counter()
    with open_store(cfg.source) as src:
        meta = src.meta()
        if meta is None:
            raise StoreError(f"nothing to export: {src.where} does not exist (run idx build)")
        total = src.count()
        with open_store(cfg.dest) as dst:
            dst.ensure(meta)   # MetaMismatch when the destination holds other vectors
            doc = {"source": describe(cfg.source), "source_meta_sha256": meta_sha256(meta),
                   "source_points": total, "started_at": time.time(), "complete": False}
            previous = dst.get_doc(EXPORT_DOC)
            if previous and previous.get("source_meta_sha256") == doc["source_meta_sha256"]:
                log.info("resuming the export started at %s", previous.get("started_at"))
            dst.put_doc(EXPORT_DOC, doc)
            exported, skipped, seen, stopped = _copy_points(src, dst, cfg, total, on_progress)
            complete = not stopped
            docs = _copy_docs(src, dst) if complete else []
            points = dst.count()
            if complete and points != total:
                log.warning("%s holds %d points, the source %d: points that are not in the "
                            "source were left in place", dst.where, points, total)
            seconds = time.perf_counter() - t0
            summary = {"exported": exported, "skipped_existing": skipped,
                       "seconds": round(seconds, 2), "points": points,
                       "source_points": total, "scanned": seen, "complete": complete,
                       "docs": docs, "source": describe(cfg.source),
                       "destination": describe(cfg.dest),
                       "points_per_s": round(exported / seconds, 1) if seconds else None}
            dst.put_doc(EXPORT_DOC, dict(doc, **{k: v for k, v in summary.items()
                                                 if k not in ("source", "destination")},
                                         finished_at=time.time()))
    return summary


def _copy_points(src: Store, dst: Store, cfg: ExportConfig, total: int,
                 on_progress: Callable[[dict], None] | None) -> tuple[int, int, int, bool]:
    """(written, skipped as already present and equal, scanned, stopped by the limit)."""
    exported = skipped = seen = 0
    for page in _pages(src.scroll(with_vectors=True, batch=cfg.batch_size), cfg.batch_size):
        have = {h.id: h.payload for h in dst.retrieve([h.id for h in page], with_vectors=False)}
        todo = [h for h in page if have.get(h.id) != h.payload]
        skipped += len(page) - len(todo)
        if cfg.limit is not None and exported + len(todo) >= cfg.limit:
            todo = todo[:cfg.limit - exported]
            stopped = True
        else:
            stopped = False
        if todo:
            dst.upsert([to_point(h) for h in todo])
        exported += len(todo)
        seen += len(page)
        if on_progress:
            on_progress(dict(done=seen, total=total, exported=exported, skipped=skipped,
                             page=len(page)))
        if stopped:
            log.info("stopped after %d points (limit); rerun to continue", exported)
            return exported, skipped, seen, True
    return exported, skipped, seen, False


def _copy_docs(src: Store, dst: Store) -> list[str]:
    """The side documents, copied after every point is in place."""
    copied = []
    folders = src.get_doc("folders") or {}   # folder sources: a registry plus a doc per folder
    names = [*SIDE_DOCS, "folders", *(info["doc"] for info in folders.values() if "doc" in info)]
    for name in names:
        doc = src.get_doc(name)
        if doc is not None:
            dst.put_doc(name, doc)
            copied.append(name)
    return copied
