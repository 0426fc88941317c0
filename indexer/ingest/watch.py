"""Folder sync front ends of `idx build`: `--dry-run` (what a sync would do, changing nothing)
and `--watch` (sync, then keep syncing the paths that change, with the model and the store held
open in this one process). The sync itself is pipeline.sync_pass."""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

from phisearch.indexer.ingest.folder_pass import folder_sources, unavailable_entry
from phisearch.indexer.ingest.pipeline import (
    BuildConfig,
    collection_meta,
    known_folders,
    split_data,
    sync_pass,
)
from phisearch.indexer.ingest.resume import load_records, plan
from phisearch.indexer.ingest.summary import FILE_COUNTS, unavailable_paths
from phisearch.indexer.model.embedder import Embedder
from phisearch.indexer.sources.folders import hidden, is_image_name, resolve_root, scan
from phisearch.indexer.sources.records import FileEvent
from phisearch.indexer.sources.shards import expand
from phisearch.indexer.store import open_store

log = logging.getLogger(__name__)


def dry_run(cfg: BuildConfig) -> dict:
    """What `build` would do, changing nothing (no model is loaded): folder file counts (new,
    changed, deleted, unchanged) and shards to index. With `hash_files` every file is read."""
    patterns, roots = split_data(cfg.data, known_folders(cfg.store, cfg.data))
    urls = expand(patterns) if patterns else []
    with open_store(cfg.store) as store:
        exists = store.meta() is not None
        records = load_records(store, urls, write=False) if exists else {}
        todo, already, changed = plan(urls, records)
        sources, _, _ = folder_sources(store, roots, cfg.dataset, cfg.hash_files)
        points = store.count() if exists else 0
    folders, skipped = {}, Counter()
    for src in sources:
        c: Counter[str] = Counter()
        away = []
        for item in scan(src, decode=False):
            if isinstance(item, FileEvent):
                c[item.kind] += 1
            else:
                c["skip:" + item.reason] += 1
                skipped[item.reason] += 1
                if item.kept is not None:
                    away.append(unavailable_entry(src.root, item.key or "", item.reason,
                                                  item.detail, item.kept))
        folders[src.root] = dict(
            {k: c.get(k, 0) for k in FILE_COUNTS}, dataset=src.dataset,
            skipped={k.removeprefix("skip:"): v for k, v in c.items() if k.startswith("skip:")},
            unavailable=away, kept=sum(a["kept"] for a in away))
    return {"dry_run": True, **{k: sum(f[k] for f in folders.values()) for k in FILE_COUNTS},
            "skipped": dict(skipped), "folders": folders,
            "unavailable": unavailable_paths(folders),
            "shards_to_index": len(todo) - len(changed), "shards_already_done": len(already),
            "shards_changed": len(changed), "points": points,
            "collection": cfg.store.collection}


class _WatchFilter:
    """Events worth a sync: image files, folders, deletions; never hidden names or the store."""

    def __init__(self, ignore: str | None):
        self.ignore = ignore

    def __call__(self, change: object, path: str) -> bool:
        from watchfiles import Change

        if self.ignore and (path == self.ignore or path.startswith(self.ignore + os.sep)):
            return False
        name = os.path.basename(path)
        if name.startswith("."):
            return False
        return change == Change.deleted or is_image_name(name) or os.path.isdir(path)


def _changed_paths(changes: set[tuple[object, str]], roots: list[str]
                   ) -> dict[str, tuple[str, ...]]:
    """Watch events -> {folder root: changed relpaths} ("" = the whole folder)."""
    out: dict[str, list[str]] = defaultdict(list)
    for _, path in changes:
        for root in roots:
            if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
                rel = Path(os.path.relpath(path, root)).as_posix()
                rel = "" if rel == "." else rel
                if not hidden(rel) and rel not in out[root]:
                    out[root].append(rel)
                break
    return {r: tuple(sorted(v)) for r, v in out.items() if v}


def watch(cfg: BuildConfig, on_sync: Callable[[dict], None],
          on_progress: Callable[[dict], None] | None = None, stop: threading.Event | None = None,
          debounce_ms: int = 500) -> dict:
    """`idx build --watch`: a full sync, then a sync of the paths that change (new or modified
    files indexed, deleted ones removed) until `stop` is set or Ctrl-C; the model and the store
    stay open in this process. `on_sync(summary)` follows every sync that changed something.
    Returns the last summary."""
    from watchfiles import watch as watch_paths

    patterns, roots = split_data(cfg.data, known_folders(cfg.store, cfg.data))
    if not roots:
        raise ValueError("--watch needs a folder in --data")
    for root in roots:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"cannot watch {root}: not found (a drive that is away?); "
                                    "nothing was changed, its points are kept")
    urls = expand(patterns) if patterns else []
    stop = stop or threading.Event()
    emb = Embedder.create(cfg.checkpoint, cfg.phi, cfg.device)
    meta = collection_meta(emb)
    store_dir = resolve_root(cfg.store.path) if cfg.store.path else None
    with open_store(cfg.store) as store:
        store.ensure(meta)
        # The watcher starts before the first sync (its first wait times out after rust_timeout),
        # so a file written while that sync runs is caught by the next one.
        events = watch_paths(*roots, watch_filter=_WatchFilter(store_dir), debounce=debounce_ms,
                             stop_event=stop, rust_timeout=500, yield_on_timeout=True,
                             raise_interrupt=False)
        next(events, None)
        summary = sync_pass(store, meta, emb, cfg, urls, roots, on_progress, stop)
        on_sync(summary)
        for changes in ([] if stop.is_set() else events):
            only = _changed_paths(changes, roots)
            if not only:
                continue
            summary = sync_pass(store, meta, emb, cfg, [], list(only), on_progress, stop, only)
            if any(summary[k] for k in ("new", "changed", "deleted")) or summary["skipped"]:
                on_sync(summary)
            if stop.is_set():
                break
        events.close()
    return summary
