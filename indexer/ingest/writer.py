"""The build's writer: a background thread that upserts batches in order and records what
they complete (shards, folder files) only after their points are stored."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from phisearch.indexer.sources.folders import doc_name
from phisearch.indexer.store import SHARDS_DOC, PointData, Store

log = logging.getLogger(__name__)


@dataclass
class FolderUpdate:
    """What one batch changes in a folder's record; applied only after its points are stored."""
    files: dict[str, list] = field(default_factory=dict)          # indexed: relpath -> fingerprint
    skipped: dict[str, tuple[list, str]] = field(default_factory=dict)  # relpath -> (fp, reason)
    gone: list[str] = field(default_factory=list)                  # relpaths no longer on disk
    delete_ids: list[str] = field(default_factory=list)            # points of gone or now-bad files


class Writer(threading.Thread):
    """Upserts batches in order, then records the shards they complete and the folder files they
    hold. Folder records are written at most every `flush_every` seconds and at the end, so a
    SIGKILL redoes at most that much; Ctrl-C and normal ends lose nothing."""

    def __init__(self, store: Store, records: dict, stale: dict[str, set[str]],
                 folders: dict[str, dict] | None = None, flush_every: float = 1.0):
        super().__init__(daemon=True, name="phisearch-writer")
        self.store, self.records, self.stale = store, records, stale
        self.folders = folders if folders is not None else {}   # root -> folder doc
        self.flush_every = flush_every
        self.q: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.written = 0
        self.deleted = 0    # points removed: of gone folder files and vanished shard samples
        self.written_by_shard: Counter[str] = Counter()
        self._dirty: set[str] = set()
        self._flushed_at = time.monotonic()

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                try:
                    self._flush()
                except BaseException as e:  # noqa: BLE001 - surfaced in the main thread
                    self.error = self.error or e
                return
            if self.error is not None:
                continue  # drain without writing after a failure
            points, done, folders = item
            try:
                t0 = time.perf_counter()
                if points:
                    self.store.upsert(points)
                for url, rec in done:
                    gone = self.stale.pop(url, set()) - rec.pop("_ids")
                    if gone:
                        rec["deleted"] = self.store.delete(ids=sorted(gone))
                        self.deleted += rec["deleted"]
                    self.records[url] = rec
                if done:
                    self.store.put_doc(SHARDS_DOC, self.records)
                for root, update in (folders or {}).items():
                    self._apply(root, update)
                if self._dirty and time.monotonic() - self._flushed_at >= self.flush_every:
                    self._flush()
                self.seconds += time.perf_counter() - t0
                self.written += len(points)
            except BaseException as e:  # noqa: BLE001 - surfaced in the main thread
                self.error = e

    def _apply(self, root: str, u: FolderUpdate) -> None:
        if u.delete_ids:
            self.deleted += self.store.delete(ids=sorted(set(u.delete_ids)))
        doc = self.folders[root]
        files, skipped = doc["files"], doc["skipped"]
        for key, fp in u.files.items():
            files[key] = fp
            skipped.pop(key, None)
        for key, (fp, reason) in u.skipped.items():
            files[key] = fp
            skipped[key] = reason
        for key in u.gone:
            files.pop(key, None)
            skipped.pop(key, None)
        self._dirty.add(root)

    def _flush(self) -> None:
        for root in sorted(self._dirty):
            self.store.put_doc(doc_name(root), self.folders[root])
        self._dirty.clear()
        self._flushed_at = time.monotonic()

    def put(self, points: list[PointData], done: list[tuple[str, dict]],
            folders: dict[str, FolderUpdate] | None = None) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((points, done, folders))
