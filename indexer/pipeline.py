"""`idx build`: shards -> φ -> Qdrant, resumable, with per-stage timings.

reader (DataLoader workers decode JPEGs) -> mapper (φ on the device, main thread) -> writer (a
background thread upserting points, overlapped with the next batch's φ). A shard is recorded as
done only after the writer has stored its last point, so an interrupted build (Ctrl-C, SIGKILL)
redoes exactly the unfinished shards, and deterministic point ids make the redo overwrite rather
than duplicate.
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
from .shards import Batch, Sample, expand, fingerprint, folder_info, loader
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
        points.append(PointData(id=point_id(s.dataset, s.key), vector=vec.astype(np.float32),
                                sparse_indices=idx, sparse_values=vals, payload=payload))
    return points


class Writer(threading.Thread):
    """Upserts batches in order and then records the shards they complete."""

    def __init__(self, store: Store, records: dict, stale: dict[str, set[str]]):
        super().__init__(daemon=True, name="phisearch-writer")
        self.store, self.records, self.stale = store, records, stale
        self.q: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.written = 0
        self.written_by_shard: Counter[str] = Counter()

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain without writing after a failure
            points, done = item
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
                self.seconds += time.perf_counter() - t0
                self.written += len(points)
            except BaseException as e:  # noqa: BLE001 - surfaced in the main thread
                self.error = e

    def put(self, points: list[PointData], done: list[tuple[str, dict]]) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((points, done))


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


def build(cfg: BuildConfig, on_progress: Callable[[dict], None] | None = None) -> dict:
    """Index the shards into the store. Returns the summary (CONTRACT `idx build --json`)."""
    t_start = time.perf_counter()
    urls = expand(cfg.data)
    emb = Embedder.create(cfg.checkpoint, cfg.phi, cfg.device)
    meta = emb.meta()
    with open_store(cfg.store) as store:
        store.ensure(meta)
        records: dict = store.get_doc(SHARDS_DOC) or {}
        todo, already, changed = plan(urls, records)
        stale = {}
        for url in changed:  # remember the points of a changed shard; delete the vanished ones
            ds = folder_info(url, cfg.dataset).dataset
            stale[url] = {h.id for h in store.scroll({"dataset": ds,
                                                      "shard": os.path.basename(url)})}
            log.info("shard changed since indexed: %s", url)
        # Written first, so that a build killed outright still shows what it left pending.
        previous = store.get_doc(LAST_RUN_DOC) or {}
        store.put_doc(LAST_RUN_DOC, dict(previous, pending=todo, running_since=time.time()))
        writer = Writer(store, records, stale)
        writer.start()
        per_shard: dict[str, Counter] = defaultdict(Counter)
        ids_by_shard: dict[str, set[str]] = defaultdict(set)
        skipped: Counter[str] = Counter()
        skip_list: list[dict] = []
        t_decode = t_phi = 0.0
        indexed = 0
        interrupted = False
        try:
            if todo:
                it = iter(loader(todo, cfg.batch_size, workers=cfg.workers, dataset=cfg.dataset))
                while True:
                    t0 = time.perf_counter()
                    batch: Batch | None = next(it, None)
                    t_decode += time.perf_counter() - t0
                    if batch is None:
                        break
                    for s in batch.skips:
                        skipped[s.reason] += 1
                        per_shard[s.shard]["skip:" + s.reason] += 1
                        if len(skip_list) < MAX_LISTED_SKIPS:
                            skip_list.append(dict(shard=s.shard, key=s.key, reason=s.reason,
                                                  detail=s.detail))
                        log.warning("skipped %s %s: %s %s", s.shard, s.key or "", s.reason,
                                    s.detail)
                    points: list[PointData] = []
                    if batch.samples:
                        t0 = time.perf_counter()
                        dense, mid = emb(batch.images())
                        t_phi += time.perf_counter() - t0
                        points = make_points(batch.samples, dense, mid, meta)
                        for s, p in zip(batch.samples, points):
                            per_shard[s.shard]["indexed"] += 1
                            ids_by_shard[s.shard].add(p.id)
                    done = [(url, _record(url, per_shard.pop(url, Counter()),
                                          ids_by_shard.pop(url, set())))
                            for url in batch.shards_done]
                    writer.put(points, done)
                    indexed += len(points)
                    if on_progress:
                        on_progress(dict(indexed=indexed, written=writer.written,
                                         batch=len(points), skipped=sum(skipped.values())))
        except KeyboardInterrupt:
            interrupted = True
            log.warning("interrupted: finishing the batches already computed")
        finally:
            writer.q.put(None)
            writer.join()
        if writer.error is not None:
            raise writer.error
        seconds = time.perf_counter() - t_start
        summary = {
            "indexed": indexed,
            "skipped": dict(skipped),
            "skipped_samples": skip_list,
            "seconds": round(seconds, 2),
            "img_per_s": round(indexed / seconds, 2) if seconds else 0.0,
            "stages": {
                "decode_wait_s": round(t_decode, 2), "phi_s": round(t_phi, 2),
                "upsert_s": round(writer.seconds, 2),
                "phi_img_per_s": round(indexed / t_phi, 2) if t_phi else None,
                "upsert_points_per_s": round(writer.written / writer.seconds, 1)
                if writer.seconds else None,
            },
            "shards_indexed": len(todo) if not interrupted else None,
            "shards_already_done": len(already),
            "shards_changed": len(changed),
            "points": store.count(),
            "interrupted": interrupted,
            "pending": [u for u in todo if u not in records],
            "collection": cfg.store.collection,
            "settings": {k: meta[k] for k in ("checkpoint", "model_sha256", "readout", "sigma",
                                              "draws", "seed")},
            "finished_at": time.time(),
        }
        store.put_doc(LAST_RUN_DOC, {k: v for k, v in summary.items() if k != "skipped_samples"})
        if interrupted:
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
        skipped: Counter[str] = Counter()
        for rec in records.values():
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
            "last_run": last,
        }
