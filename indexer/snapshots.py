"""Snapshots of a collection: `idx snapshot create | list | restore`.

Edge: a snapshot is a tar.gz of the collection folder (the shard with its WAL and segments,
meta.json, docs/) written to <store>/.snapshots/<collection>/. It is taken while this process
holds the shard's only handle (after a flush), so no build can write during the copy: a build
that runs holds the handle and the snapshot refuses with StoreBusy instead of copying a moving
target. Restore unpacks into a temporary folder beside the store, checks that the shard opens,
and swaps folders with rename while holding the live shard's handle.
Server: Qdrant's own snapshot API, for the collection and its companion metadata collection.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import time
from pathlib import Path

from .store import (
    SNAPSHOT_DIR,
    EdgeStore,
    StoreConfig,
    StoreError,
    _write_json,
    finish_swap,
    open_store,
    swap_journal,
)


def _edge_dir(store: EdgeStore) -> Path:
    return store.root / SNAPSHOT_DIR / store.name


def create(cfg: StoreConfig) -> dict:
    """Take a snapshot; returns {name, points, path|server names, created_at}."""
    with open_store(cfg) as store:
        if store.meta() is None:
            raise StoreError(f"no collection in {store.where}: nothing to snapshot")
        if isinstance(store, EdgeStore):
            return _edge_create(store)
        return _server_create(store)


def _edge_create(store: EdgeStore) -> dict:
    shard = store._need()
    shard.flush()
    points = store.count()
    created = time.time()
    name = f"{store.name}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(created))}" \
           f"-{int(created * 1000) % 1000:03d}"
    out = _edge_dir(store)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.tar.gz.tmp"
    # compresslevel 1: the WAL files are mostly preallocated zeros; vectors barely compress.
    with tarfile.open(tmp, "w:gz", compresslevel=1) as tf:
        for item in ("shard", "meta.json", "docs"):
            if (store.dir / item).exists():
                tf.add(store.dir / item, arcname=item)
    tmp.rename(out / f"{name}.tar.gz")
    info = {"name": name, "collection": store.name, "points": points, "created_at": created,
            "bytes": (out / f"{name}.tar.gz").stat().st_size,
            "model_sha256": (store.meta() or {}).get("model_sha256")}
    _write_json(out / f"{name}.json", info)
    return dict(info, path=str(out / f"{name}.tar.gz"))


def list_snapshots(cfg: StoreConfig) -> list[dict]:
    """Snapshots of the collection, oldest first."""
    if cfg.url:
        with open_store(cfg) as store:
            return _server_list(store)
    from .aliases import edge_resolve

    # Reading the snapshot folder needs no shard handle, so listing works during a build.
    root = Path(cfg.path or "")
    folder = root / SNAPSHOT_DIR / edge_resolve(root, cfg.collection)
    infos = []
    for meta in sorted(folder.glob("*.json")):
        if (folder / f"{meta.stem}.tar.gz").is_file():
            infos.append(json.loads(meta.read_text()))
    return sorted(infos, key=lambda i: i["created_at"])


def restore(cfg: StoreConfig, name: str) -> dict:
    """Replace the collection with snapshot `name`: exactly its points, payloads and docs."""
    if cfg.url:
        with open_store(cfg) as store:
            return _server_restore(store, name)
    with open_store(cfg) as store:
        assert isinstance(store, EdgeStore)
        archive = _edge_dir(store) / f"{name}.tar.gz"
        if not archive.is_file():
            known = [i["name"] for i in list_snapshots(cfg)]
            raise StoreError(f"no snapshot {name} of {store.where} (known: "
                             f"{', '.join(known) or 'none'})")
        staging = store.root / f".restore-{store.name}-{time.time_ns()}"
        try:
            with tarfile.open(archive, "r:gz") as tf:
                tf.extractall(staging, filter="data")
            probe = store.qe.EdgeShard.load(str(staging / "shard"))  # it must open before swap
            points = int(probe.count(store.qe.CountRequest(exact=True)))
            probe.close()
            trash = store.root / f".trash-{store.name}-{time.time_ns()}"
            # We hold the collection's lock: no one else opens it during the swap. Close the
            # live shard, journal the swap, rename both folders; a kill anywhere in between is
            # finished or undone by the next open (store.finish_swap).
            if store.shard is not None:
                store.shard.close()
                store.shard = None
            _write_json(swap_journal(store.root, store.name),
                        {"staging": str(staging), "trash": str(trash)})
            if store.dir.exists():
                store.dir.rename(trash)
            staging.rename(store.dir)
            finish_swap(store.root, store.name, interrupted=False)   # journal, trash: gone
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return {"name": name, "collection": store.name, "points": points}


# -- server: Qdrant's snapshot API ------------------------------------------------------------
# Not runnable here (no server); the test suite runs these when QDRANT_URL is set.

def _server_create(store) -> dict:
    with store._errors("create snapshot"):
        main = store.client.create_snapshot(store.name, wait=True)
        meta = store.client.create_snapshot(store.meta_name, wait=True)
    return {"name": main.name, "meta_snapshot": meta.name, "collection": store.name,
            "points": store.count(), "created_at": time.time(), "bytes": main.size}


def _server_list(store) -> list[dict]:
    with store._errors("list snapshots"):
        snaps = store.client.list_snapshots(store.name)
    return sorted(({"name": s.name, "created_at": s.creation_time, "bytes": s.size,
                    "collection": store.name} for s in snaps), key=lambda i: i["created_at"] or "")


def _server_restore(store, name: str, snapshots_dir: str = "/qdrant/snapshots") -> dict:
    """Recover both collections from the server's own snapshot files. The metadata snapshot
    taken with `name` is the first one of the companion created at or after it."""
    with store._errors("list snapshots"):
        main = {s.name: s for s in store.client.list_snapshots(store.name)}
        metas = sorted(store.client.list_snapshots(store.meta_name),
                       key=lambda s: s.creation_time or "")
    if name not in main:
        raise StoreError(f"no snapshot {name} of {store.where}")
    when = main[name].creation_time or ""
    meta = next((s for s in metas if (s.creation_time or "") >= when), None)
    with store._errors("recover snapshot"):
        store.client.recover_snapshot(store.name, f"file://{snapshots_dir}/{store.name}/{name}",
                                      wait=True)
        if meta is not None:
            store.client.recover_snapshot(
                store.meta_name, f"file://{snapshots_dir}/{store.meta_name}/{meta.name}",
                wait=True)
    return {"name": name, "collection": store.name, "points": store.count()}
