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
import queue
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .config import PhiConfig
from .embedder import Embedder, sparse_of
from .folders import FOLDERS_DOC, FolderSource, doc_name, resolve_root
from .shards import Batch, Sample, expand, fingerprint, folder_info, loader, shard_key
from .store import PointData, Store, StoreConfig, open_store, point_id

log = logging.getLogger(__name__)

SHARDS_DOC = "shards"       # resume records: shard url -> {fingerprint, indexed, skipped, ...}
LAST_RUN_DOC = "last_run"   # the last build's summary (idx status)
MAX_LISTED_SKIPS = 200      # skipped samples listed one by one in the summary


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


def thumbnail(image: np.ndarray, quality: int = 90) -> str:
    """The 64x64 model input as a base64 JPEG, so the UI and other services can show a point
    without the shards (about 3 kB a point)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return base64.b64encode(buf.getvalue()).decode()


def make_points(samples: list[Sample], dense: np.ndarray, mid: np.ndarray, meta: dict
                ) -> list[PointData]:
    points = []
    for s, vec, (idx, vals) in zip(samples, dense, sparse_of(mid)):
        payload = {
            "dataset": s.dataset, "split": s.split, "shard": os.path.basename(s.shard),
            "shard_url": s.shard, "key": s.key, "label": s.label, "label_name": s.label_name,
            "phi_norm": float(np.linalg.norm(vec)), "active_channels": len(idx),
            "model_sha256": meta["model_sha256"], "readout": meta["readout"],
            "sigma": meta["sigma"], "draws": meta["draws"], "seed": meta["seed"],
            "schema_version": meta["schema_version"], "thumb": thumbnail(s.image),
        }
        if s.path is not None:  # a folder's file: where the full image is
            payload["path"] = s.path
        points.append(PointData(id=point_id(s.dataset, s.key), vector=vec.astype(np.float32),
                                sparse_indices=idx, sparse_values=vals, payload=payload))
    return points


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
        self.deleted = 0
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


def split_data(data: tuple[str, ...] | list[str]) -> tuple[list[str], list[str]]:
    """--data entries -> (shard patterns, folder roots): an existing directory is a folder."""
    patterns: list[str] = []
    roots: list[str] = []
    for entry in data:
        if os.path.isdir(os.path.expanduser(entry)):
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


FILE_COUNTS = ("new", "changed", "deleted", "unchanged")


def sync_pass(store: Store, meta: dict, emb: Embedder, cfg: BuildConfig, urls: list[str],
          roots: list[str], on_progress: Callable[[dict], None] | None = None,
          stop: threading.Event | None = None,
          only: dict[str, tuple[str, ...]] | None = None) -> dict:
    """One pass: unfinished shards and the new, changed and gone files of the folders (of the
    `only` paths in them, for watch mode). Returns the summary; never raises on a stop."""
    t_start = time.perf_counter()
    records = load_records(store, urls)
    todo, already, changed = plan(urls, records)
    stale = {}
    for url in changed:  # remember the points of a changed shard; delete the vanished ones
        ds = folder_info(url, cfg.dataset).dataset
        stale[url] = {h.id for h in store.scroll({"dataset": ds,
                                                  "shard": os.path.basename(url)})}
        log.info("shard changed since indexed: %s", url)
    sources, docs, registry = folder_sources(store, roots, cfg, only)
    for src in sources:  # claimed before indexing, so an interrupted build still holds the name
        registry.setdefault(src.root, {}).update(dataset=src.dataset, doc=src.doc)
    if sources:
        store.put_doc(FOLDERS_DOC, registry)
    # Written first, so that a build killed outright still shows what it left pending.
    previous = store.get_doc(LAST_RUN_DOC) or {}
    store.put_doc(LAST_RUN_DOC, dict(previous, pending=todo, running_since=time.time()))
    writer = Writer(store, records, stale, docs)
    writer.start()
    by_root = {src.root: src for src in sources}
    per_folder: dict[str, Counter] = {r: Counter() for r in by_root}
    walked: Counter[str] = Counter()
    readers = 1
    per_shard: dict[str, Counter] = defaultdict(Counter)
    ids_by_shard: dict[str, set[str]] = defaultdict(set)
    skipped: Counter[str] = Counter()
    skip_list: list[dict] = []
    failed: list[dict] = []
    t_decode = t_phi = 0.0
    indexed = 0
    interrupted = False
    try:
        if todo or sources:
            dl = loader(todo, cfg.batch_size, workers=cfg.workers, dataset=cfg.dataset,
                        folders=sources)
            readers = max(1, dl.num_workers)
            it = iter(dl)
            while True:
                t0 = time.perf_counter()
                batch: Batch | None = next(it, None)
                t_decode += time.perf_counter() - t0
                if batch is None:
                    break
                updates: dict[str, FolderUpdate] = defaultdict(FolderUpdate)
                failed += shard_failures(batch)
                for s in batch.skips:
                    skipped[s.reason] += 1
                    if len(skip_list) < MAX_LISTED_SKIPS:
                        skip_list.append(dict(shard=s.shard, key=s.key, reason=s.reason,
                                              detail=s.detail))
                    log.warning("skipped %s %s: %s %s", s.shard, s.key or "", s.reason,
                                s.detail)
                    src = by_root.get(s.shard)
                    if src is None:
                        per_shard[s.shard]["skip:" + s.reason] += 1
                        continue
                    per_folder[src.root]["skip:" + s.reason] += 1
                    if s.fp is None:  # a walk problem or an unreadable file: retried next time
                        continue
                    was = s.key in src.record
                    per_folder[src.root]["changed" if was else "new"] += 1
                    updates[src.root].skipped[s.key] = (s.fp, s.reason)
                    if was:  # a file that went bad: its old point no longer shows it
                        updates[src.root].delete_ids.append(point_id(src.dataset, s.key))
                for e in batch.events:
                    per_folder[e.root][e.kind] += 1
                    if e.kind == "deleted":
                        updates[e.root].gone.append(e.key)
                        updates[e.root].delete_ids.append(point_id(by_root[e.root].dataset, e.key))
                points: list[PointData] = []
                if batch.samples:
                    t0 = time.perf_counter()
                    dense, mid = emb(batch.images())
                    t_phi += time.perf_counter() - t0
                    points = make_points(batch.samples, dense, mid, meta)
                    kept: list[PointData] = []
                    for s, p in zip(batch.samples, points):
                        src = by_root.get(s.shard)
                        if src is None:
                            if p.id in ids_by_shard[s.shard]:   # a key twice in one tar
                                per_shard[s.shard]["skip:duplicate_key"] += 1
                                skipped["duplicate_key"] += 1
                                log.warning("skipped %s %s: duplicate_key (the first is kept)",
                                            s.shard, s.key)
                                continue
                            per_shard[s.shard]["indexed"] += 1
                            ids_by_shard[s.shard].add(p.id)
                            kept.append(p)
                            continue
                        kept.append(p)
                        c = per_folder[src.root]
                        c["changed" if s.key in src.record else "new"] += 1
                        c["indexed"] += 1
                        updates[src.root].files[s.key] = s.fp
                    points = kept
                walked.update(batch.folders_done)
                done = [(url, _record(url, per_shard.pop(url, Counter()),
                                      ids_by_shard.pop(url, set())))
                        for url in batch.shards_done]
                writer.put(points, done, dict(updates))
                indexed += len(points)
                if on_progress:
                    on_progress(dict(indexed=indexed, written=writer.written,
                                     batch=len(points), skipped=sum(skipped.values())))
                if stop is not None and stop.is_set():
                    interrupted = True
                    log.warning("stopped: this batch is stored, the rest waits for the next run")
                    break
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: finishing the batches already computed")
    finally:
        writer.q.put(None)
        writer.join()
    if writer.error is not None:
        raise writer.error
    folders = {}
    for root, src in by_root.items():
        doc, c = docs[root], per_folder[root]
        folders[root] = dict(
            {k: c.get(k, 0) for k in FILE_COUNTS}, dataset=src.dataset,
            indexed=c.get("indexed", 0), complete=walked[root] >= readers,
            skipped={k.removeprefix("skip:"): v for k, v in c.items() if k.startswith("skip:")})
        registry[root].update(files=len(doc["files"]) - len(doc["skipped"]),
                              skipped=dict(Counter(doc["skipped"].values())))
        if folders[root]["complete"] and only is None:
            registry[root]["synced_at"] = time.time()
    if sources:
        store.put_doc(FOLDERS_DOC, registry)
    return finish_summary(
        cfg, store, writer, meta, indexed=indexed, skipped=skipped, skip_list=skip_list,
        t_start=t_start, decode_s=round(t_decode, 2), phi_s=round(t_phi, 2),
        phi_img_per_s=round(indexed / t_phi, 2) if t_phi else None, folders=folders, todo=todo,
        already=len(already), changed=len(changed), interrupted=interrupted, failed=failed)


def shard_failures(batch: Batch) -> list[dict]:
    """The batch's failed shards as summary entries, each logged on one line."""
    out = []
    for f in batch.shards_failed:
        log.warning("shard failed, not recorded as done: %s: %s %s", f.shard, f.reason, f.detail)
        out.append(dict(shard=f.shard, reason=f.reason, detail=f.detail))
    return out


def finish_summary(cfg: BuildConfig, store: Store, writer: Writer, meta: dict, *, indexed: int,
                   skipped: Counter, skip_list: list[dict], t_start: float, decode_s: float,
                   phi_s: float, phi_img_per_s: float | None, folders: dict, todo: list[str],
                   already: int, changed: int, interrupted: bool, failed: list[dict],
                   extra_stages: dict | None = None, **extra) -> dict:
    """The build summary (CONTRACT `idx build --json`), shared by the single-process and the
    distributed build, and stored as the last_run doc (without the listed skipped samples)."""
    seconds = time.perf_counter() - t_start
    summary = {
        "indexed": indexed,
        "skipped": dict(skipped),
        "skipped_samples": skip_list,
        "seconds": round(seconds, 2),
        "img_per_s": round(indexed / seconds, 2) if seconds else 0.0,
        "stages": {
            "decode_wait_s": decode_s, "phi_s": phi_s,
            "upsert_s": round(writer.seconds, 2),
            "phi_img_per_s": phi_img_per_s,
            "upsert_points_per_s": round(writer.written / writer.seconds, 1)
            if writer.seconds else None,
            **(extra_stages or {}),
        },
        **{k: sum(f[k] for f in folders.values()) for k in FILE_COUNTS},
        "folders": folders,
        "shards_indexed": len(todo) - len(failed) if not interrupted else None,
        "shards_failed": failed,
        "shards_already_done": already,
        "shards_changed": changed,
        "points": store.count(),
        "interrupted": interrupted,
        "pending": [u for u in todo if u not in writer.records],
        "collection": cfg.store.collection,
        "settings": {k: meta[k] for k in ("checkpoint", "model_sha256", "readout", "sigma",
                                          "draws", "seed")},
        "finished_at": time.time(),
        **extra,
    }
    doc = {k: v for k, v in summary.items() if k != "skipped_samples"}
    previous = store.get_doc(LAST_RUN_DOC) or {}
    nothing_done = (not indexed and not todo and not interrupted and not skipped
                    and not any(summary[k] for k in ("new", "changed", "deleted")))
    if nothing_done and previous.get("finished_at"):
        # A rebuild that found everything done keeps the last real run's summary for
        # `idx status` (it used to overwrite it with "0 indexed"), noting when it checked.
        doc = {k: v for k, v in previous.items() if k != "running_since"}
        doc.update(pending=[], checked_at=summary["finished_at"])
    store.put_doc(LAST_RUN_DOC, doc)
    return summary


def build(cfg: BuildConfig, on_progress: Callable[[dict], None] | None = None,
          stop: threading.Event | None = None) -> dict:
    """Index the shards and sync the folders into the store. Returns the summary (CONTRACT
    `idx build --json`, plus folder file counts). A stop (Ctrl-C, or `stop` set: the current
    batch is finished first) raises KeyboardInterrupt once everything computed is stored."""
    patterns, roots = split_data(cfg.data)
    urls = expand(patterns) if patterns else []
    emb = Embedder.create(cfg.checkpoint, cfg.phi, cfg.device)
    meta = emb.meta()
    with open_store(cfg.store) as store:
        store.ensure(meta)
        summary = sync_pass(store, meta, emb, cfg, urls, roots, on_progress, stop)
    if summary["interrupted"]:
        raise KeyboardInterrupt
    return summary


def _record(url: str, counts: Counter, ids: set[str]) -> dict:
    return {"fingerprint": fingerprint(url), "indexed": counts.get("indexed", 0),
            "skipped": {k.removeprefix("skip:"): v for k, v in counts.items()
                        if k.startswith("skip:")},
            "completed_at": time.time(), "_ids": ids}


def status(store_cfg: StoreConfig) -> dict | None:
    """`idx status`: None when the collection does not exist."""
    with open_store(store_cfg) as store:
        meta = store.meta()
        if meta is None:
            return None
        records = store.get_doc(SHARDS_DOC) or {}
        last = store.get_doc(LAST_RUN_DOC)
        folders = store.get_doc(FOLDERS_DOC) or {}
        skipped: Counter[str] = Counter()
        for rec in list(records.values()) + list(folders.values()):
            skipped.update(rec.get("skipped", {}))
        pending = [u for u in (last or {}).get("pending", []) if u not in records]
        return {
            "points": store.count(),
            "shards_done": len(records),
            "shards_pending": len(pending),
            "skipped": dict(skipped),
            "model_sha256": meta["model_sha256"],
            "checkpoint": meta.get("checkpoint"),
            "readout": meta.get("readout"),
            "sigma": meta["sigma"], "draws": meta["draws"], "seed": meta["seed"],
            "schema_version": meta["schema_version"],
            "dim": meta.get("dim"),
            "backend": store.backend,
            "collection": store_cfg.collection,
            "shards": {u: {k: v for k, v in r.items()} for u, r in records.items()},
            "folders": folders,
            "last_run": last,
        }
