"""`idx build`: shards and folders -> φ -> Qdrant, resumable, with per-stage timings.

reader (DataLoader workers decode images) -> mapper (φ on the device, main thread) -> writer (a
background thread upserting points, overlapped with the next batch's φ). A shard is recorded as
done only after the writer has stored its last point, and a folder file only after its point is
stored, so an interrupted build (Ctrl-C, SIGKILL) redoes exactly the unfinished shards and
files; deterministic point ids make the redo overwrite rather than duplicate. Folders are kept in
sync (new and changed files indexed, gone ones deleted), once or continuously (`watch`).
"""

from __future__ import annotations

import base64
import io
import logging
import os
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from phisearch.indexer.ingest.resume import ShardTally, prepare_run
from phisearch.indexer.ingest.summary import FILE_COUNTS, RunStats, finish_summary
from phisearch.indexer.ingest.writer import FolderUpdate, Writer
from phisearch.indexer.model.config import PhiConfig
from phisearch.indexer.model.embedder import Embedder, sparse_of
from phisearch.indexer.sources.folders import FOLDERS_DOC, FolderSource, doc_name, resolve_root
from phisearch.indexer.sources.loader import loader
from phisearch.indexer.sources.records import Batch, Sample
from phisearch.indexer.sources.shards import expand, is_shard_folder
from phisearch.indexer.store import (
    SCHEMA_VERSION,
    PointData,
    Store,
    StoreConfig,
    open_store,
    point_id,
)
from PIL import Image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildConfig:
    data: tuple[str, ...]                       # shard paths / brace patterns / pipe: commands
    store: StoreConfig
    checkpoint: str | None = None               # None = the shipped default
    phi: PhiConfig = field(default_factory=PhiConfig)
    batch_size: int = 64                        # images per φ batch (times draws in the network)
    workers: int = 1                            # loader processes decoding images
    device: str = "auto"
    dataset: str | None = None                  # dataset name when the folder has no manifest
    hash_files: bool = False                    # folders: changed = content hash, not size+mtime


def collection_meta(emb: Embedder) -> dict:
    """What a collection records about how it is built (its identity: store.IDENTITY_KEYS)."""
    return dict(emb.meta(), schema_version=SCHEMA_VERSION)


def thumbnail(image: np.ndarray, quality: int = 90) -> str:
    """The 64x64 model input as a base64 JPEG, so the UI and other services can show a point
    without the shards (about 3 kB a point)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return base64.b64encode(buf.getvalue()).decode()


def make_points(samples: list[Sample], dense: np.ndarray, mid: np.ndarray, meta: dict
                ) -> list[PointData]:
    points = []
    for s, vec, m, (idx, vals) in zip(samples, dense, mid, sparse_of(mid)):
        payload = {
            "dataset": s.dataset, "split": s.split, "shard": os.path.basename(s.shard),
            "shard_url": s.shard, "key": s.key, "label": s.label, "label_name": s.label_name,
            # the paper's φ (what phi_sparse holds), not the readout (about 1 for every +l2)
            "phi_norm": float(np.linalg.norm(m)), "active_channels": len(idx),
            "model_sha256": meta["model_sha256"], "readout": meta["readout"],
            "sigma": meta["sigma"], "draws": meta["draws"], "seed": meta["seed"],
            "schema_version": meta["schema_version"], "thumb": thumbnail(s.image),
        }
        if s.path is not None:  # a folder's file: where the full image is
            payload["path"] = s.path
        points.append(PointData(id=point_id(s.dataset, s.key), vector=vec.astype(np.float32),
                                sparse_indices=idx, sparse_values=vals, payload=payload))
    return points


def embed_batch(emb: Embedder, batch: Batch, meta: dict, stats: RunStats) -> list[PointData]:
    """φ of a batch's samples and their points (the step both builds share); φ time counted."""
    if not batch.samples:
        return []
    t0 = time.perf_counter()
    dense, mid = emb(batch.images())
    stats.phi_s += time.perf_counter() - t0
    return make_points(batch.samples, dense, mid, meta)


def count_shard_points(batch: Batch, points: list[PointData], tally: ShardTally,
                       stats: RunStats, shards_only: bool = True) -> list[PointData]:
    """Count each shard sample's point in its shard's tally; drop a key seen twice in one shard
    (logged and counted as a `duplicate_key` skip). Folder samples pass through unless
    shards_only is False."""
    kept = []
    for s, p in zip(batch.samples, points):
        if s.fp is not None and shards_only:   # a folder's file: counted by its folder
            kept.append(p)
            continue
        if tally.add(s.shard, p.id):
            kept.append(p)
        else:
            stats.skips.counts["duplicate_key"] += 1
            log.warning("skipped %s %s: duplicate_key (the first is kept)", s.shard, s.key)
    return kept


def split_data(data: tuple[str, ...] | list[str]) -> tuple[list[str], list[str]]:
    """--data entries -> (shard patterns, folder roots): an existing directory is a folder of
    images, unless it holds shards (.tar, .tar.gz, .tgz) and no images at its top level."""
    patterns: list[str] = []
    roots: list[str] = []
    for entry in data:
        if os.path.isdir(os.path.expanduser(entry)) and is_shard_folder(entry):
            patterns.append(entry)
        elif os.path.isdir(os.path.expanduser(entry)):
            root = resolve_root(entry)
            if root not in roots:
                roots.append(root)
        else:
            patterns.append(entry)
    if not patterns and not roots:
        raise ValueError("no data given: pass --data with shards or folders")
    return patterns, roots


def folder_sources(store: Store, roots: list[str], cfg: BuildConfig,
                   only: dict[str, tuple[str, ...]] | None = None
                   ) -> tuple[list[FolderSource], dict[str, dict], dict]:
    """(sources, their record docs, the folder registry). A folder's dataset name is fixed by
    its first build: two folders may not share one (their point ids would collide)."""
    registry: dict = store.get_doc(FOLDERS_DOC) or {}
    sources, docs, names = [], {}, {}
    for root in roots:
        ds = cfg.dataset or os.path.basename(root) or "root"
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
        doc["hash"] = cfg.hash_files
        docs[root] = doc
        sources.append(FolderSource(root=root, dataset=ds, record=dict(doc["files"]),
                                    hash=cfg.hash_files,
                                    only=None if only is None else only.get(root, ())))
    return sources, docs, registry


class FolderPass:
    """The folders of one sync pass: what each batch changes in their records, and their
    file counts (new, changed, deleted, unchanged, indexed, skipped by reason)."""

    def __init__(self, store: Store, roots: list[str], cfg: BuildConfig,
                 only: dict[str, tuple[str, ...]] | None) -> None:
        self.sources, self.docs, self.registry = folder_sources(store, roots, cfg, only)
        self.by_root = {src.root: src for src in self.sources}
        self.counts: dict[str, Counter] = {r: Counter() for r in self.by_root}
        self.walked: Counter[str] = Counter()
        self.only = only
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
            if s.fp is None:  # a walk problem or an unreadable file: retried next time
                continue
            was = s.key in src.record
            self.counts[src.root]["changed" if was else "new"] += 1
            updates[src.root].skipped[s.key] = (s.fp, s.reason)
            if was:  # a file that went bad: its old point no longer shows it
                updates[src.root].delete_ids.append(point_id(src.dataset, s.key))
        for e in batch.events:
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
        whole by every reader, outside watch mode)."""
        out = {}
        for root, src in self.by_root.items():
            doc, c = self.docs[root], self.counts[root]
            out[root] = dict(
                {k: c.get(k, 0) for k in FILE_COUNTS}, dataset=src.dataset,
                indexed=c.get("indexed", 0), complete=self.walked[root] >= readers,
                skipped={k.removeprefix("skip:"): v for k, v in c.items()
                         if k.startswith("skip:")})
            self.registry[root].update(files=len(doc["files"]) - len(doc["skipped"]),
                                       skipped=dict(Counter(doc["skipped"].values())))
            if out[root]["complete"] and self.only is None:
                self.registry[root]["synced_at"] = time.time()
        if self.sources:
            store.put_doc(FOLDERS_DOC, self.registry)
        return out


def sync_pass(store: Store, meta: dict, emb: Embedder, cfg: BuildConfig, urls: list[str],
              roots: list[str], on_progress: Callable[[dict], None] | None = None,
              stop: threading.Event | None = None,
              only: dict[str, tuple[str, ...]] | None = None) -> dict:
    """One pass: unfinished shards and the new, changed and gone files of the folders (of the
    `only` paths in them, for watch mode). Returns the summary; never raises on a stop."""
    stats = RunStats()
    run = prepare_run(store, urls, cfg.dataset)
    folders = FolderPass(store, roots, cfg, only)
    writer = Writer(store, run.records, run.stale, folders.docs)
    writer.start()
    readers = 1
    try:
        if run.todo or folders.sources:
            dl = loader(run.todo, cfg.batch_size, workers=cfg.workers, dataset=cfg.dataset,
                        folders=folders.sources)
            readers = max(1, dl.num_workers)
            _index(iter(dl), emb, meta, writer, folders, stats, on_progress, stop)
    except KeyboardInterrupt:
        stats.interrupted = True
        log.warning("interrupted: finishing the batches already computed")
    finally:
        writer.q.put(None)
        writer.join()
    if writer.error is not None:
        raise writer.error
    return finish_summary(cfg.store.collection, store, writer, meta, run, stats,
                          folders=folders.finish(store, readers))


def _index(batches, emb: Embedder, meta: dict, writer: Writer, folders: FolderPass,
           stats: RunStats, on_progress: Callable[[dict], None] | None,
           stop: threading.Event | None) -> None:
    """The loop: each batch's φ and points to the writer, with what they complete."""
    tally = ShardTally()
    while True:
        t0 = time.perf_counter()
        batch: Batch | None = next(batches, None)
        stats.decode_s += time.perf_counter() - t0
        if batch is None:
            return
        stats.take_failures(batch)
        points = embed_batch(emb, batch, meta, stats)
        updates = folders.take(batch, points, stats, tally)
        points = count_shard_points(batch, points, tally, stats)
        writer.put(points, tally.done(batch.shards_done), updates)
        stats.indexed += len(points)
        if on_progress:
            on_progress(dict(indexed=stats.indexed, written=writer.written, batch=len(points),
                             skipped=sum(stats.skips.counts.values())))
        if stop is not None and stop.is_set():
            stats.interrupted = True
            log.warning("stopped: this batch is stored, the rest waits for the next run")
            return


def build(cfg: BuildConfig, on_progress: Callable[[dict], None] | None = None,
          stop: threading.Event | None = None) -> dict:
    """Index the shards and sync the folders into the store. Returns the summary (CONTRACT
    `idx build --json`, plus folder file counts). A stop (Ctrl-C, or `stop` set: the current
    batch is finished first) raises KeyboardInterrupt once everything computed is stored."""
    patterns, roots = split_data(cfg.data)
    urls = expand(patterns) if patterns else []
    emb = Embedder.create(cfg.checkpoint, cfg.phi, cfg.device)
    meta = collection_meta(emb)
    with open_store(cfg.store) as store:
        store.ensure(meta)
        summary = sync_pass(store, meta, emb, cfg, urls, roots, on_progress, stop)
    if summary["interrupted"]:
        raise KeyboardInterrupt
    return summary
