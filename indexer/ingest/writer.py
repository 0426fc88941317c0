"""The build's writer: a background thread that upserts batches in order and records what
they complete (shards, folder files) only after their points are stored.

It is also where a key that two shards of one dataset share is caught (both samples get one
point id): it sees the store in write order, so the point stored first is kept (as within one
shard), the later sample is a `duplicate_key` skip naming both shards, and a rerun never flips
it (the first shard's point is there). A shard re-indexed because it changed rewrites its own
points: those are not duplicates."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from phisearch.indexer.ingest.resume import same_shard, sha256_if_unchanged
from phisearch.indexer.sources.folders import doc_name
from phisearch.indexer.sources.records import Skip
from phisearch.indexer.sources.shards import fingerprint, shard_key
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
                 folders: dict[str, dict] | None = None, flush_every: float = 1.0,
                 fingerprints: dict[str, str] | None = None):
        super().__init__(daemon=True, name="phisearch-writer")
        self.store, self.records, self.stale = store, records, stale
        self.fingerprints = fingerprints or {}   # shard -> fingerprint when the run planned it
        self.duplicates: list[Skip] = []         # samples whose key another shard holds
        self._dup_of: dict[str, Counter[str]] = defaultdict(Counter)  # shard -> holder -> n
        self._swept: set[str] = set()            # shards whose vanished points were deleted
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
                points = self._claim(points)
                if points:
                    self.store.upsert(points)
                for url, rec in done:
                    self._finish(url, rec)
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

    def _claim(self, points: list[PointData]) -> list[PointData]:
        """The points to store: a shard sample whose id a point of another shard (still a shard
        of this collection) holds is dropped and counted as a duplicate of that shard."""
        ids = [p.id for p in points if "path" not in p.payload]   # folder files: their own ids
        if not ids:
            return points
        holder = {h.id: h.payload.get("shard_url")
                  for h in self.store.retrieve(ids, with_vectors=False)}
        kept = []
        for p in points:
            if "path" in p.payload:
                kept.append(p)
                continue
            mine, other = p.payload["shard_url"], holder.get(p.id)
            if other is not None and not same_shard(other, mine) and self._live(other):
                self._dup_of[mine][_key(other)] += 1
                self.duplicates.append(Skip(mine, p.payload["key"], "duplicate_key",
                                            f"also in {other}, whose point is kept"))
                continue
            holder[p.id] = mine
            kept.append(p)
        return kept

    def _live(self, url: str) -> bool:
        """A shard of this collection: recorded or planned in this run, and still there."""
        key = _key(url)
        return (key in self.records or key in self.fingerprints) and (
            key.startswith("pipe:") or os.path.exists(key))

    def _finish(self, url: str, rec: dict) -> None:
        """Record a shard whose last point is stored: with the fingerprint it had when the run
        planned it (a shard rewritten meanwhile no longer matches: the next run redoes it), its
        vanished points deleted, its duplicates of other shards counted."""
        planned = self.fingerprints.get(url)
        try:
            now = fingerprint(url)
        except OSError:
            now = None
        rec["fingerprint"] = planned if planned is not None else now
        if now != rec["fingerprint"]:
            log.warning("shard %s changed while it was indexed: the next run indexes it again",
                        url)
        else:
            rec["sha256"] = sha256_if_unchanged(url, now)
        gone = self.stale.pop(url, set()) - rec.pop("_ids")
        if gone:
            rec["deleted"] = self.store.delete(ids=sorted(gone))
            self.deleted += rec["deleted"]
            self._swept.add(url)
            self._redo_deferring_to(url)
        dups = self._dup_of.pop(url, None)
        if dups:
            n = sum(dups.values())
            rec["indexed"] -= n
            rec["skipped"]["duplicate_key"] = rec["skipped"].get("duplicate_key", 0) + n
            rec["duplicate_of"] = dict(dups)
            if self._swept & set(dups):
                self._redo(url, rec, "a shard holding its duplicate keys lost points")
        self.records[url] = rec

    def _redo_deferring_to(self, url: str) -> None:
        """`url` lost points: a shard that left keys to it may now be their only holder."""
        for other, rec in self.records.items():
            if url in (rec.get("duplicate_of") or {}):
                self._redo(other, rec, f"{url} lost points")

    @staticmethod
    def _redo(url: str, rec: dict, why: str) -> None:
        rec["fingerprint"] = None   # plan(): not done, so the next run indexes it again
        rec.pop("sha256", None)
        log.info("shard %s is indexed again by the next run: %s", url, why)

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


def _key(shard_url: str) -> str:
    """A point's shard_url as the resume records key it (older builds stored it as typed)."""
    return shard_url if shard_url.startswith("pipe:") else shard_key(shard_url)
