"""Snapshots of a collection: `idx snapshot create | list | restore`.

Each backend does it its own way (Store.snapshot / Store.restore / Backend.snapshots): an Edge
snapshot is a tar.gz of the collection folder taken while this process holds the collection's
lock, so no build can write during the copy (a running build makes it StoreBusy); its restore
is a journaled folder swap that a kill cannot leave half done. A server uses Qdrant's own
snapshot API for the collection and its companion metadata collection.
"""

from __future__ import annotations

from phisearch.indexer.store import StoreConfig, StoreError, backend, open_store


def create(cfg: StoreConfig) -> dict:
    """Take a snapshot; returns {name, collection, points, created_at, ...}."""
    with open_store(cfg) as store:
        if store.meta() is None:
            raise StoreError(f"no collection in {store.where}: nothing to snapshot")
        return store.snapshot()


def list_snapshots(cfg: StoreConfig) -> list[dict]:
    """Snapshots of the collection, oldest first (no collection handle: works during a build)."""
    with backend(cfg) as b:
        return b.snapshots(cfg.collection)


def restore(cfg: StoreConfig, name: str) -> dict:
    """Replace the collection with snapshot `name`: exactly its points, payloads and docs."""
    with open_store(cfg) as store:
        return store.restore(name)
