"""Resume: which shards a run still has to index, and the record of each shard it finishes.

A shard is done when the writer has stored its last point; its record (keyed by resolved path:
sources.shards.shard_key) holds its fingerprint, so a changed shard is indexed again and the
points it no longer holds are deleted.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

from phisearch.indexer.sources.shards import fingerprint, folder_info, shard_key
from phisearch.indexer.store import LAST_RUN_DOC, SHARDS_DOC, Store

log = logging.getLogger(__name__)


def load_records(store: Store, urls: list[str], write: bool = True) -> dict:
    """The resume records, keyed by resolved shard path (shards.shard_key). Records written
    by older versions were keyed by the path as typed; they are re-keyed here (to the resolved
    path when it exists from here, else to the shard of this run with the same file name and
    fingerprint), duplicates of one shard merged (the latest kept), and written back."""
    records: dict = store.get_doc(SHARDS_DOC) or {}
    by_name: dict[str, list[str]] = defaultdict(list)
    for url in urls:
        by_name[os.path.basename(url)].append(url)
    migrated: dict = {}
    for key, rec in records.items():
        new = key
        if not key.startswith("pipe:") and not os.path.isabs(key):
            new = shard_key(key) if os.path.exists(key) else next(
                (u for u in by_name.get(os.path.basename(key), [])
                 if os.path.exists(u) and fingerprint(u) == rec.get("fingerprint")), key)
        old = migrated.get(new)
        if old is None or rec.get("completed_at", 0) >= old.get("completed_at", 0):
            migrated[new] = rec
    if migrated != records and write:
        log.info("resume records re-keyed by resolved path: %d -> %d", len(records), len(migrated))
        store.put_doc(SHARDS_DOC, migrated)
    return migrated


def plan(urls: list[str], records: dict) -> tuple[list[str], list[str], list[str]]:
    """(to index, already done, changed since done). A shard is done by name and fingerprint."""
    todo, done, changed = [], [], []
    for url in urls:
        rec = records.get(url)
        if rec is None:
            todo.append(url)
        elif rec.get("fingerprint") == fingerprint(url):
            done.append(url)
        else:
            todo.append(url)
            changed.append(url)
    return todo, done, changed


@dataclass
class RunPlan:
    records: dict                   # the resume records (migrated)
    todo: list[str]                 # shards to index: new or changed
    already: list[str]              # done and unchanged
    changed: list[str]              # done, but changed since
    stale: dict[str, set[str]]      # changed shard -> the ids it held (the vanished get deleted)


def prepare_run(store: Store, urls: list[str], dataset: str | None, **note) -> RunPlan:
    """Plan the run and write its start-of-run record first, so a build killed outright still
    shows what it left pending (`note`: extra fields for that record)."""
    records = load_records(store, urls)
    todo, already, changed = plan(urls, records)
    stale = {}
    for url in changed:
        ds = folder_info(url, dataset).dataset
        stale[url] = {h.id for h in store.scroll({"dataset": ds,
                                                  "shard": os.path.basename(url)})}
        log.info("shard changed since indexed: %s", url)
    previous = store.get_doc(LAST_RUN_DOC) or {}
    store.put_doc(LAST_RUN_DOC, dict(previous, pending=todo, running_since=time.time(), **note))
    return RunPlan(records, todo, already, changed, stale)


class ShardTally:
    """Counts and point ids per shard until the shard is done. A key seen twice in one shard is
    counted once (a `duplicate_key` skip; the first is kept), so `indexed` is what is stored."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.ids: dict[str, set[str]] = defaultdict(set)

    def skip(self, shard: str, reason: str) -> None:
        self.counts[shard]["skip:" + reason] += 1

    def add(self, shard: str, pid: str) -> bool:
        """Count a point of `shard`; False for a duplicate key (then counted as a skip)."""
        if pid in self.ids[shard]:
            self.skip(shard, "duplicate_key")
            return False
        self.counts[shard]["indexed"] += 1
        self.ids[shard].add(pid)
        return True

    def done(self, urls: list[str]) -> list[tuple[str, dict]]:
        """The records of shards that just ended (their counters are released)."""
        return [(url, _record(url, self.counts.pop(url, Counter()), self.ids.pop(url, set())))
                for url in urls]


def _record(url: str, counts: Counter, ids: set[str]) -> dict:
    return {"fingerprint": fingerprint(url), "indexed": counts.get("indexed", 0),
            "skipped": {k.removeprefix("skip:"): v for k, v in counts.items()
                        if k.startswith("skip:")},
            "completed_at": time.time(), "_ids": ids}
