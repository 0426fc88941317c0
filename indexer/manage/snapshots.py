"""Snapshots of a collection: `idx snapshot create | list | restore`.

Each backend does it its own way (Store.snapshot / Store.restore / Backend.snapshots): an Edge
snapshot is a tar.gz of the collection folder taken while this process holds the collection's
lock, so no build can write during the copy (a running build makes it StoreBusy); its restore
is a journaled folder swap that a kill cannot leave half done. A server uses Qdrant's own
snapshot API for the collection and its companion metadata collection.
"""

from __future__ import annotations

from phisearch.indexer.manage.aliases import missing_collection
from phisearch.indexer.store import StoreConfig, StoreError, backend, open_store
from phisearch.indexer.store.base import check_name


def create(cfg: StoreConfig, name: str | None = None) -> dict:
    """Take a snapshot, named `name` or by the time; returns {name, collection, points,
    created_at, ...}. A Qdrant server names snapshots itself: a name is refused there."""
    if name is not None:
        check_name(name, "snapshot")
    with open_store(cfg) as store:
        if store.meta() is None:
            raise StoreError(missing_collection(cfg, "nothing to snapshot"))
        if name is None:
            return store.snapshot()
        if not store.names_snapshots:
            raise StoreError(f"{store.where} names its snapshots itself: leave out the name "
                             f"{name!r}")
        return store.snapshot(name)


def list_snapshots(cfg: StoreConfig) -> list[dict]:
    """Snapshots of the collection, oldest first (no collection handle: works during a build).
    A name with neither a collection nor snapshots (a wrong --store or --collection) is an
    error, not an empty list; snapshots of a collection since dropped are still listed."""
    with backend(cfg) as b:
        snaps = b.snapshots(cfg.collection)
        if not snaps and not b.has(cfg.collection):
            raise StoreError(missing_collection(cfg, "no snapshots either"))
        return snaps


def restore(cfg: StoreConfig, name: str) -> dict:
    """Replace the collection with snapshot `name`: exactly its points, payloads and docs."""
    with open_store(cfg) as store:
        return store.restore(name)
