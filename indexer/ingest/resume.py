"""Resume: which shards a run still has to index, and the record of each shard it finishes.

A shard is done when the writer has stored its last point; its record (keyed by resolved path:
sources.shards.shard_key) holds its fingerprint as taken when the run planned it, before any
of it was read, so a shard rewritten while it is indexed is indexed again by the next run, and
the sha256 of its bytes: a shard whose size is the same but whose mtime moved (a dataset copied,
restored or re-provisioned) is compared by content and stays done when its bytes are. A
changed shard is indexed again and the points it no longer holds are deleted: the points whose
`shard_url` is that shard, never those of a shard with the same file name in another folder.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

from phisearch.indexer.sources.shards import content_hash, fingerprint, folder_info, shard_key
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


def plan(urls: list[str], records: dict, fingerprints: dict[str, str] | None = None
         ) -> tuple[list[str], list[str], list[str]]:
    """(to index, already done, changed since done). A shard is done by name and fingerprint
    (a record without one is to be redone), or by content when only its mtime moved
    (prepare_run then records the new fingerprint). `fingerprints`, when given, gets each
    shard's."""
    todo, done, changed = [], [], []
    for url in urls:
        rec = records.get(url)
        fp = fingerprint(url)
        if fingerprints is not None:
            fingerprints[url] = fp
        if rec is None:
            todo.append(url)
        elif rec.get("fingerprint") == fp:
            done.append(url)
        elif same_content(url, rec, fp):
            log.info("shard %s: new mtime, same bytes (sha256): already done", url)
            done.append(url)
        else:
            todo.append(url)
            changed.append(url)
    return todo, done, changed


def sha256_if_unchanged(url: str, fp: str | None) -> str | None:
    """The shard's content hash for same_content: None for a pipe, an unreadable file or one
    whose fingerprint is not `fp` once hashed (it changed meanwhile)."""
    try:
        sha = content_hash(url)
        return sha if fingerprint(url) == fp else None
    except OSError:
        return None


def same_content(url: str, rec: dict, fp: str) -> bool:
    """A done shard's file has its recorded size and sha256 (read only when the size matches)."""
    old, sha = rec.get("fingerprint"), rec.get("sha256")
    if old is None or sha is None or old.split(":")[0] != fp.split(":")[0]:
        return False
    return sha256_if_unchanged(url, fp) == sha


@dataclass
class RunPlan:
    records: dict                   # the resume records (migrated)
    todo: list[str]                 # shards to index: new or changed
    already: list[str]              # done and unchanged
    changed: list[str]              # done, but changed since
    stale: dict[str, set[str]]      # changed shard -> the ids it held (the vanished get deleted)
    fingerprints: dict[str, str]    # shard -> its fingerprint when planned, before it was read


def prepare_run(store: Store, urls: list[str], dataset: str | None, **note) -> RunPlan:
    """Plan the run and write its start-of-run record first, so a build killed outright still
    shows what it left pending (`note`: extra fields for that record)."""
    records = load_records(store, urls)
    fingerprints: dict[str, str] = {}
    todo, already, changed = plan(urls, records, fingerprints)
    dirty = False
    for url in already:
        rec = records[url]
        if rec["fingerprint"] != fingerprints[url]:   # done by content: same bytes, new mtime
            rec["fingerprint"], dirty = fingerprints[url], True
        if not url.startswith("pipe:") and not rec.get("sha256"):
            # done by a version that kept no hash: read once, so a later copy resumes
            rec["sha256"], dirty = sha256_if_unchanged(url, fingerprints[url]), True
    if dirty:
        store.put_doc(SHARDS_DOC, records)
    stale = {}
    known = set(records) | set(urls)
    for url in changed:
        ds = folder_info(url, dataset).dataset
        stale[url] = held_by(store, url, ds, known)
        log.info("shard changed since indexed: %s", url)
    previous = store.get_doc(LAST_RUN_DOC) or {}
    store.put_doc(LAST_RUN_DOC, dict(previous, pending=todo, running_since=time.time(), **note))
    return RunPlan(records, todo, already, changed, stale,
                   {u: fingerprints[u] for u in todo})


def same_shard(shard_url: str | None, url: str) -> bool:
    """A point's `shard_url` names shard `url` (resolved: older builds stored it as typed)."""
    if not shard_url:
        return False
    return shard_url == url or (not shard_url.startswith("pipe:") and shard_key(shard_url) == url)


def held_by(store: Store, url: str, dataset: str, known: set[str]) -> set[str]:
    """The ids of the points shard `url` holds: of its dataset and file name (indexed fields),
    and with its path as `shard_url`, so a shard of the same name in another folder keeps its
    points. A point from a build that stored the path as typed (relative) is this shard's when
    that path resolves to it here, or when no other known shard has this file name."""
    name = os.path.basename(url)
    alone = not any(os.path.basename(k) == name for k in known if k != url)
    ids = set()
    for h in store.scroll({"dataset": dataset, "shard": name}):
        su = h.payload.get("shard_url")
        legacy = bool(su) and not su.startswith("pipe:") and not os.path.isabs(su)
        if same_shard(su, url) or (legacy and alone):
            ids.add(h.id)
    return ids


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
    """A finished shard's record; the writer adds the fingerprint the run planned it with."""
    return {"indexed": counts.get("indexed", 0),
            "skipped": {k.removeprefix("skip:"): v for k, v in counts.items()
                        if k.startswith("skip:")},
            "completed_at": time.time(), "_ids": ids}
