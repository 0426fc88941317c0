"""The folders of one sync pass: their sources (records, dataset names), what each batch changes
in their records, their counts, and what could not be read (kept, reported, never deleted)."""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict

from phisearch.indexer.ingest.resume import ShardTally
from phisearch.indexer.ingest.summary import FILE_COUNTS, MAX_LISTED_SKIPS, RunStats
from phisearch.indexer.ingest.writer import FolderUpdate
from phisearch.indexer.sources.folders import (
    FOLDERS_DOC,
    FolderSource,
    doc_name,
    mount_point,
    under,
)
from phisearch.indexer.sources.records import Batch
from phisearch.indexer.store import PointData, Store, point_id


def folder_sources(store: Store, roots: list[str], dataset: str | None, hash_files: bool,
                   only: dict[str, tuple[str, ...]] | None = None
                   ) -> tuple[list[FolderSource], dict[str, dict], dict]:
    """(sources, their record docs, the folder registry). A folder's dataset name is fixed by
    its first build: two folders may not share one (their point ids would collide)."""
    registry: dict = store.get_doc(FOLDERS_DOC) or {}
    sources, docs, names = [], {}, {}
    for root in roots:
        ds = dataset or os.path.basename(root) or "root"
        clash = [r for r, info in registry.items() if info.get("dataset") == ds and r != root]
        clash += [r for r, n in names.items() if n == ds]
        if clash:
            raise ValueError(f"dataset name {ds!r} is already used by folder {clash[0]} in this "
                             f"collection: give {root} its own name with --dataset")
        names[root] = ds
        doc = store.get_doc(doc_name(root)) or {"root": root, "dataset": ds, "files": {},
                                                "skipped": {}}
        if doc["dataset"] != ds:
            raise ValueError(f"{root} was indexed as dataset {doc['dataset']!r}; pass "
                             f"--dataset {doc['dataset']} to keep its points in sync")
        doc["hash"] = hash_files
        docs[root] = doc
        sources.append(FolderSource(root=root, dataset=ds, record=dict(doc["files"]),
                                    hash=hash_files,
                                    only=None if only is None else only.get(root, ()),
                                    mounts=dict(registry.get(root, {}).get("mounts") or {})))
    return sources, docs, registry


def unavailable_entry(root: str, rel: str, reason: str, detail: str, kept: int) -> dict:
    """One path that could not be read, as the summary, the registry and `idx status` show it."""
    path = root if rel in ("", ".") else os.path.join(root, rel)
    return {"path": path, "rel": "" if rel == "." else rel, "reason": reason, "detail": detail,
            "kept": kept}


class FolderPass:
    """The folders of one sync pass: what each batch changes in their records, and their
    file counts (new, changed, deleted, unchanged, indexed, skipped by reason)."""

    def __init__(self, store: Store, roots: list[str], dataset: str | None, hash_files: bool,
                 only: dict[str, tuple[str, ...]] | None) -> None:
        self.sources, self.docs, self.registry = folder_sources(store, roots, dataset,
                                                                hash_files, only)
        self.by_root = {src.root: src for src in self.sources}
        self.counts: dict[str, Counter] = {r: Counter() for r in self.by_root}
        self.walked: Counter[str] = Counter()
        self.only = only
        self.unavailable: dict[str, list[dict]] = defaultdict(list)   # root -> this pass's
        self.kept: Counter[str] = Counter()      # root -> points kept under what is unreadable
        self.mounts: dict[str, dict[str, str]] = defaultdict(dict)    # root -> rel -> mount
        for src in self.sources:   # claimed first, so an interrupted build still holds the name
            self.registry.setdefault(src.root, {}).update(dataset=src.dataset, doc=src.doc)
        if self.sources:
            store.put_doc(FOLDERS_DOC, self.registry)

    def owns(self, shard: str) -> bool:
        return shard in self.by_root

    def take(self, batch: Batch, points: list[PointData], stats: RunStats,
             tally: ShardTally) -> dict[str, FolderUpdate]:
        """Count the batch's skips, file events and folder samples; returns the folder
        record updates to apply once its points are stored."""
        updates: dict[str, FolderUpdate] = defaultdict(FolderUpdate)
        for s in batch.skips:
            stats.skips.add(s)
            src = self.by_root.get(s.shard)
            if src is None:
                tally.skip(s.shard, s.reason)
                continue
            self.counts[src.root]["skip:" + s.reason] += 1
            if s.kept is not None:   # a path that could not be read: its points are kept
                self.kept[src.root] += s.kept
                if len(self.unavailable[src.root]) < MAX_LISTED_SKIPS:   # listed: the first
                    self.unavailable[src.root].append(
                        unavailable_entry(src.root, s.key or "", s.reason, s.detail, s.kept))
            if s.fp is None:  # a walk problem or an unreadable file: retried next time
                continue
            was = s.key in src.record
            self.counts[src.root]["changed" if was else "new"] += 1
            updates[src.root].skipped[s.key] = (s.fp, s.reason)
            if was:  # a file that went bad: its old point no longer shows it
                updates[src.root].delete_ids.append(point_id(src.dataset, s.key))
        for e in batch.events:
            if e.kind == "mount":   # a directory on another device: recorded (away_mounts)
                self.mounts[e.root][e.key] = mount_point(os.path.join(e.root, e.key))
                continue
            self.counts[e.root][e.kind] += 1
            if e.kind == "deleted":
                updates[e.root].gone.append(e.key)
                updates[e.root].delete_ids.append(point_id(self.by_root[e.root].dataset, e.key))
        for s in batch.samples:
            src = self.by_root.get(s.shard)
            if src is not None:
                c = self.counts[src.root]
                c["changed" if s.key in src.record else "new"] += 1
                c["indexed"] += 1
                updates[src.root].files[s.key] = s.fp
        self.walked.update(batch.folders_done)
        return dict(updates)

    def finish(self, store: Store, readers: int) -> dict:
        """Per-folder summaries; the registry updated (synced_at once a folder was walked
        whole by every reader, outside watch mode; the mount points and the paths that could
        not be read, for the next pass and `idx status`)."""
        out = {}
        for root, src in self.by_root.items():
            doc, c = self.docs[root], self.counts[root]
            away = self.unavailable.get(root, [])
            out[root] = dict(
                {k: c.get(k, 0) for k in FILE_COUNTS}, dataset=src.dataset,
                indexed=c.get("indexed", 0), complete=self.walked[root] >= readers,
                skipped={k.removeprefix("skip:"): v for k, v in c.items()
                         if k.startswith("skip:")},
                unavailable=away, kept=self.kept[root])
            reg = self.registry[root]
            reg.update(files=len(doc["files"]) - len(doc["skipped"]),
                       skipped=dict(Counter(doc["skipped"].values())))
            self._remember(root, reg, out[root]["complete"])
            if out[root]["complete"] and self.only is None:
                reg["synced_at"] = time.time()
        if self.sources:
            store.put_doc(FOLDERS_DOC, self.registry)
        return out

    def _remember(self, root: str, reg: dict, complete: bool) -> None:
        """The registry's mount points and unreadable paths after this pass. What the pass
        looked at (the whole folder, or the watched paths) is replaced when it finished; the
        rest, and every mount under a path that could not be read, is kept as it was."""
        looked = ("",) if self.only is None else tuple(self.only.get(root, ()))
        now = self.unavailable.get(root, [])
        away_rels = [a["rel"] for a in now]
        redone = looked if complete else ()
        mounts = {rel: mp for rel, mp in (reg.get("mounts") or {}).items()
                  if not under(rel, redone) or under(rel, away_rels)}
        mounts.update(self.mounts.get(root, {}))
        if "" in redone and not under("", away_rels) and os.path.isdir(root):
            mp = mount_point(root)   # the folder's own drive (not "/": that is never away)
            if mp == os.sep:
                mounts.pop("", None)
            else:
                mounts[""] = mp
        reg["mounts"] = mounts
        since = {a["path"]: a.get("since") for a in reg.get("unavailable") or []}
        kept = [a for a in reg.get("unavailable") or [] if not under(a["rel"], redone)
                and a["path"] not in {b["path"] for b in now}]
        reg["unavailable"] = (kept + [dict(a, since=since.get(a["path"]) or time.time())
                                      for a in now])[-MAX_LISTED_SKIPS:]
