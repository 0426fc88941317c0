"""The build summary (CONTRACT `idx build --json`), the last-run record and `idx status`."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from phisearch.indexer.ingest.resume import RunPlan
from phisearch.indexer.ingest.writer import Writer
from phisearch.indexer.sources.folders import FOLDERS_DOC
from phisearch.indexer.sources.records import Batch, Skip
from phisearch.indexer.store import (
    CLUSTERS_DOC,
    LAST_RUN_DOC,
    SHARDS_DOC,
    Store,
    StoreConfig,
    open_store,
)

log = logging.getLogger(__name__)

MAX_LISTED_SKIPS = 200      # skipped samples listed one by one in the summary
FILE_COUNTS = ("new", "changed", "deleted", "unchanged")


class SkipLog:
    """Every skipped sample: counted by reason, logged, and the first MAX_LISTED_SKIPS listed."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.listed: list[dict] = []

    def add(self, s: Skip) -> None:
        self.counts[s.reason] += 1
        if len(self.listed) < MAX_LISTED_SKIPS:
            self.listed.append(dict(shard=s.shard, key=s.key, reason=s.reason, detail=s.detail))
        log.warning("skipped %s %s: %s %s", s.shard, s.key or "", s.reason, s.detail)


@dataclass
class RunStats:
    """What one run did, as the summary reports it."""
    t_start: float = field(default_factory=time.perf_counter)
    skips: SkipLog = field(default_factory=SkipLog)
    failed: list[dict] = field(default_factory=list)   # shards that could not be read at all
    indexed: int = 0                                   # points stored (duplicates not counted)
    decode_s: float = 0.0                              # waiting for the loader
    phi_s: float = 0.0                                 # computing φ
    interrupted: bool = False

    def take_failures(self, batch: Batch) -> None:
        """The batch's failed shards, each logged on one line."""
        for f in batch.shards_failed:
            log.warning("shard failed, not recorded as done: %s: %s %s", f.shard, f.reason,
                        f.detail)
            self.failed.append(dict(shard=f.shard, reason=f.reason, detail=f.detail))


def finish_summary(collection: str, store: Store, writer: Writer, meta: dict, run: RunPlan,
                   stats: RunStats, folders: dict | None = None,
                   phi_img_per_s: float | None = None, extra_stages: dict | None = None,
                   **extra) -> dict:
    """The build summary (CONTRACT `idx build --json`), shared by the single-process and the
    distributed build, and stored as the last_run doc (without the listed skipped samples)."""
    seconds = time.perf_counter() - stats.t_start
    folders = folders or {}
    for dup in writer.duplicates:   # keys another shard holds: dropped by the writer
        stats.skips.add(dup)
    stats.indexed -= len(writer.duplicates)
    if phi_img_per_s is None and stats.phi_s:
        phi_img_per_s = round(stats.indexed / stats.phi_s, 2)
    summary = {
        "indexed": stats.indexed,
        "skipped": dict(stats.skips.counts),
        "skipped_samples": stats.skips.listed,
        "seconds": round(seconds, 2),
        "img_per_s": round(stats.indexed / seconds, 2) if seconds else 0.0,
        "stages": {
            "decode_wait_s": round(stats.decode_s, 2), "phi_s": round(stats.phi_s, 2),
            "upsert_s": round(writer.seconds, 2),
            "phi_img_per_s": phi_img_per_s,
            "upsert_points_per_s": round(writer.written / writer.seconds, 1)
            if writer.seconds else None,
            **(extra_stages or {}),
        },
        **{k: sum(f[k] for f in folders.values()) for k in FILE_COUNTS},
        "folders": folders,
        # folder paths that could not be read: their points kept, never deleted
        "unavailable": unavailable_paths(folders),
        "shards_indexed": None if stats.interrupted else len(run.todo) - len(stats.failed),
        "shards_failed": stats.failed,
        "shards_already_done": len(run.already),
        "shards_changed": len(run.changed),
        "points": store.count(),
        "interrupted": stats.interrupted,
        "pending": [u for u in run.todo if u not in writer.records],
        "collection": collection,
        "settings": {k: meta[k] for k in ("checkpoint", "model_sha256", "readout", "sigma",
                                          "draws", "seed")},
        "finished_at": time.time(),
        "clustering": mark_clusters_stale(store, writer.written + writer.deleted),
        **extra,
    }
    store.put_doc(LAST_RUN_DOC, _last_run_doc(store, summary, nothing_done=(
        not stats.indexed and not run.todo and not stats.interrupted and not stats.skips.counts
        and not any(summary[k] for k in ("new", "changed", "deleted")))))
    return summary


def unavailable_paths(folders: dict) -> list[dict]:
    """Every folder's paths that could not be read (offline, unreadable), in one list, each
    with its folder: {folder, path, rel, reason, detail, kept[, since]}."""
    return [dict(a, folder=root) for root, f in sorted(folders.items())
            for a in f.get("unavailable") or []]


CLUSTER_KEYS = ("method", "preprocess", "projection", "points", "noise", "created_at",
                "stale", "stale_since", "changed_points", "unclustered")


def clustering_state(doc: dict | None) -> dict | None:
    """What `idx status` and the UI show of the last `idx cluster` (None: never clustered)."""
    if doc is None:
        return None
    return {**{k: doc.get(k) for k in CLUSTER_KEYS}, "stale": bool(doc.get("stale")),
            "clusters": len(doc.get("clusters") or [])}


def mark_clusters_stale(store: Store, changed: int) -> dict | None:
    """A build that wrote or removed points after `idx cluster` leaves the clustering stale: an
    upsert replaces a point's payload, so the points it wrote have no cluster_id, and the
    summary's sizes no longer add up. Marked in the clusters doc (until `idx cluster` reruns)
    and said once on stderr. Returns the clustering's state, None when never clustered."""
    doc = store.get_doc(CLUSTERS_DOC)
    if doc is None or not changed:
        return clustering_state(doc)
    labelled = store.count({"cluster_id": {"gte": -1}})   # has any cluster_id, noise included
    doc.update(stale=True, stale_since=doc.get("stale_since") or time.time(),
               changed_points=int(doc.get("changed_points") or 0) + changed,
               unclustered=store.count() - labelled)
    store.put_doc(CLUSTERS_DOC, doc)
    log.warning("the clustering is stale: %d points written or removed since `idx cluster` "
                "(%d without cluster_id); rerun `idx cluster`", changed, doc["unclustered"])
    return clustering_state(doc)


def _last_run_doc(store: Store, summary: dict, nothing_done: bool) -> dict:
    """The summary as stored for `idx status`. A rebuild that found everything done keeps the
    last real run's summary (it used to overwrite it with "0 indexed"), noting when it checked."""
    previous = store.get_doc(LAST_RUN_DOC) or {}
    if nothing_done and previous.get("finished_at"):
        doc = {k: v for k, v in previous.items() if k != "running_since"}
        doc.update(pending=[], checked_at=summary["finished_at"])
        return doc
    return {k: v for k, v in summary.items() if k != "skipped_samples"}


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
        redo = [u for u, r in records.items() if r.get("fingerprint") is None]  # writer._redo
        pending = [u for u in (last or {}).get("pending", []) if u not in records] + redo
        return {
            "points": store.count(),
            "shards_done": len(records) - len(redo),
            "shards_pending": len(pending),
            "skipped": dict(skipped),
            "model_sha256": meta["model_sha256"],
            "checkpoint": meta.get("checkpoint"),
            "readout": meta.get("readout"),
            "sigma": meta["sigma"], "draws": meta["draws"], "seed": meta["seed"],
            "schema_version": meta["schema_version"],
            "dim": meta.get("dim"),
            "device": meta.get("device"),   # that made the vectors (None: not recorded)
            "backend": store.backend,
            "collection": store_cfg.collection,
            "resolved_collection": store.name,   # the target when --collection is an alias
            "pending": pending,
            "shards": {u: {k: v for k, v in r.items()} for u, r in records.items()},
            "folders": folders,
            "unavailable": unavailable_paths(folders),
            "last_run": last,
            "clustering": clustering_state(store.get_doc(CLUSTERS_DOC)),
        }
