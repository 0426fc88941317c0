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
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import numpy as np
from phisearch.indexer.ingest.folder_pass import FolderPass
from phisearch.indexer.ingest.resume import ShardTally, prepare_run
from phisearch.indexer.ingest.summary import RunStats, finish_summary
from phisearch.indexer.ingest.writer import Writer
from phisearch.indexer.model.config import PhiConfig
from phisearch.indexer.model.embedder import Embedder, sparse_of
from phisearch.indexer.sources.folders import FOLDERS_DOC, resolve_root
from phisearch.indexer.sources.loader import loader
from phisearch.indexer.sources.records import Batch, Sample, Skip
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
    """What a collection records about how it is built (its identity: store.IDENTITY_KEYS),
    and the device that made its vectors (shown by idx status; not identity: φ's numerics are
    the same on a GPU and a CPU, phi.DEVICE_RTOL)."""
    return dict(emb.meta(), schema_version=SCHEMA_VERSION, device=emb.device.type)


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
    (a `duplicate_key` skip; the same key in two shards is caught by the writer). Folder
    samples pass through unless shards_only is False."""
    kept = []
    for s, p in zip(batch.samples, points):
        if s.fp is not None and shards_only:   # a folder's file: counted by its folder
            kept.append(p)
            continue
        if tally.add(s.shard, p.id):
            kept.append(p)
        else:   # counted, logged and listed like the other skips
            stats.skips.add(Skip(s.shard, s.key, "duplicate_key",
                                 "twice in this shard, the first is kept"))
    return kept


def split_data(data: tuple[str, ...] | list[str], known: Collection[str] = ()
               ) -> tuple[list[str], list[str]]:
    """--data entries -> (shard patterns, folder roots): an existing directory is a folder of
    images, unless it holds shards (.tar, .tar.gz, .tgz) and no images at its top level. A
    path that is missing but is a folder this collection indexed (`known`, known_folders) stays
    a folder, reported offline with its points kept; any other missing path is an error."""
    patterns: list[str] = []
    roots: list[str] = []
    for entry in data:
        path = os.path.expanduser(entry)
        if os.path.isdir(path) and _holds_shards(entry):
            patterns.append(entry)
        elif os.path.isdir(path) or (_plain(entry) and resolve_root(entry) in known):
            root = resolve_root(entry)
            if root not in roots:
                roots.append(root)
        elif _plain(entry) and not os.path.lexists(path):
            raise FileNotFoundError(f"{entry} not found: no such folder or shard file (nothing "
                                    "was changed)")
        else:
            patterns.append(entry)
    if not patterns and not roots:
        raise ValueError("no data given: pass --data with shards or folders")
    return patterns, roots


def _plain(entry: str) -> bool:
    """A --data entry that names one path (not a brace pattern or a pipe: command)."""
    return not entry.startswith("pipe:") and "{" not in entry


def _holds_shards(entry: str) -> bool:
    """A folder that cannot be listed is a folder of images (reported unreadable, its points
    kept), not an error here."""
    try:
        return is_shard_folder(entry)
    except OSError:
        return False


def known_folders(store_cfg: StoreConfig, data: tuple[str, ...] | list[str]) -> set[str]:
    """The folder roots the collection has indexed, read only when a --data path is missing:
    a folder on a drive that is away is then kept as a folder (offline), its points kept."""
    missing = [e for e in data if _plain(e) and not os.path.lexists(os.path.expanduser(e))]
    if not missing or (store_cfg.path and not os.path.isdir(store_cfg.path)):
        return set()
    with open_store(store_cfg) as store:
        return set(store.get_doc(FOLDERS_DOC) or {})


def sync_pass(store: Store, meta: dict, emb: Embedder, cfg: BuildConfig, urls: list[str],
              roots: list[str], on_progress: Callable[[dict], None] | None = None,
              stop: threading.Event | None = None,
              only: dict[str, tuple[str, ...]] | None = None) -> dict:
    """One pass: unfinished shards and the new, changed and gone files of the folders (of the
    `only` paths in them, for watch mode). Returns the summary; never raises on a stop."""
    stats = RunStats()
    run = prepare_run(store, urls, cfg.dataset)
    folders = FolderPass(store, roots, cfg.dataset, cfg.hash_files, only)
    writer = Writer(store, run.records, run.stale, folders.docs,
                    fingerprints=run.fingerprints)
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
    patterns, roots = split_data(cfg.data, known_folders(cfg.store, cfg.data))
    urls = expand(patterns) if patterns else []
    emb = Embedder.create(cfg.checkpoint, cfg.phi, cfg.device)
    meta = collection_meta(emb)
    with open_store(cfg.store) as store:
        store.ensure(meta)
        summary = sync_pass(store, meta, emb, cfg, urls, roots, on_progress, stop)
    if summary["interrupted"]:
        raise KeyboardInterrupt
    return summary
