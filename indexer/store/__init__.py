"""The vector store: one interface over Qdrant Edge (in-process, a folder) and a Qdrant server.

    backend(cfg)      the place (an Edge folder or a server): collections, aliases, snapshots
    open_store(cfg)   one collection, open (Edge: locked) until close(); on a server the
                      first write (ensure()) takes the collection's write lease (lease.py)

base.py holds the interface and imports no backend; edge.py and server.py import only base
(and the Edge files and lock, or the server lease, they own).
"""

from __future__ import annotations

from phisearch.indexer.store.base import (
    CLUSTERS_DOC,
    DENSE,
    IDENTITY_KEYS,
    INDEXES,
    INT64_MAX,
    INT64_MIN,
    LAST_RUN_DOC,
    NAMESPACE,
    SCHEMA_VERSION,
    SHARDS_DOC,
    SPARSE,
    Backend,
    Hit,
    MetaMismatch,
    PointData,
    Store,
    StoreBusy,
    StoreConfig,
    StoreError,
    parse_filter,
    plain,
    point_id,
)

__all__ = [
    "CLUSTERS_DOC",
    "DENSE",
    "IDENTITY_KEYS",
    "INDEXES",
    "INT64_MAX",
    "INT64_MIN",
    "LAST_RUN_DOC",
    "NAMESPACE",
    "SCHEMA_VERSION",
    "SHARDS_DOC",
    "SPARSE",
    "Backend",
    "Hit",
    "MetaMismatch",
    "PointData",
    "Store",
    "StoreBusy",
    "StoreConfig",
    "StoreError",
    "backend",
    "backend_class",
    "open_store",
    "parse_filter",
    "plain",
    "point_id",
]


def backend_class(cfg: StoreConfig) -> type[Backend]:
    """The kind of place cfg names (nothing opened or connected): a Qdrant server when url is
    set, else an Edge store folder."""
    if cfg.url:
        from phisearch.indexer.store.server import ServerBackend

        return ServerBackend
    from phisearch.indexer.store.edge import EdgeBackend

    return EdgeBackend


def backend(cfg: StoreConfig) -> Backend:
    """The place cfg names, ready (a server is connected to: an unreachable one fails here)."""
    return backend_class(cfg)(cfg)


def open_store(cfg: StoreConfig) -> Store:
    """Collection cfg.collection, open (an alias resolved to its target)."""
    return backend(cfg).open()
