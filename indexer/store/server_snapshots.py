"""Server snapshots restored through Qdrant's HTTP API alone.

A snapshot is a file the server keeps wherever its own configuration says (a volume, another
`snapshots_path`, S3), so a restore never guesses a path for `recover_snapshot("file://...")`:
it downloads the file (GET /collections/{c}/snapshots/{s}), checks its sha256 against the one the
server listed, and uploads it back (POST /collections/{c}/snapshots/upload, priority=snapshot,
the checksum again so the server checks it too). The copy passes through a temporary file
($TMPDIR), one collection at a time.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from urllib.parse import quote

import httpx
from phisearch.indexer.store.base import StoreConfig, StoreError
from phisearch.indexer.store.server_errors import errors
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

CHUNK = 1 << 20


def companion(main: models.SnapshotDescription,
              metas: list[models.SnapshotDescription]) -> models.SnapshotDescription | None:
    """The metadata snapshot taken with `main`: the companion's first one created at or after it
    (ServerStore.snapshot takes them in that order)."""
    when = main.creation_time or ""
    return next((s for s in sorted(metas, key=lambda s: s.creation_time or "")
                 if (s.creation_time or "") >= when), None)


def download(cfg: StoreConfig, collection: str, snap: models.SnapshotDescription,
             dest: Path) -> None:
    """Stream snapshot `snap` of `collection` from the server into `dest`, checking its sha256.
    (qdrant-client's generated `get_snapshot` parses the body as JSON, so plain httpx it is.)"""
    url = (f"{(cfg.url or '').rstrip('/')}/collections/{quote(collection, safe='')}"
           f"/snapshots/{quote(snap.name, safe='')}")
    headers = {"api-key": cfg.api_key} if cfg.api_key else {}
    digest = hashlib.sha256()
    try:
        with httpx.stream("GET", url, headers=headers, timeout=cfg.timeout) as r:
            if r.status_code != 200:
                r.read()
                raise UnexpectedResponse.for_response(r)
            with open(dest, "wb") as f:
                for chunk in r.iter_bytes(CHUNK):
                    digest.update(chunk)
                    f.write(chunk)
    except httpx.TransportError as e:   # what qdrant-client's own REST calls raise for these
        raise ResponseHandlingException(e) from None
    if snap.checksum and digest.hexdigest() != snap.checksum:
        raise StoreError(f"snapshot {snap.name} of {collection} came back with sha256 "
                         f"{digest.hexdigest()[:12]}..., the server listed {snap.checksum[:12]}...")


def upload(client: QdrantClient, collection: str, path: Path, checksum: str | None) -> None:
    """Recover `collection` from the snapshot file at `path` (replacing what it holds)."""
    with open(path, "rb") as f:
        client.http.snapshots_api.recover_from_uploaded_snapshot(
            collection_name=collection, wait=True, priority="snapshot", checksum=checksum,
            snapshot=f)


def recover(client: QdrantClient, cfg: StoreConfig, where: str,
            pairs: list[tuple[str, models.SnapshotDescription]]) -> None:
    """Each (collection, snapshot) in turn: downloaded, then uploaded back into the collection."""
    with tempfile.TemporaryDirectory(prefix="phisearch-snapshot-") as tmp:
        for collection, snap in pairs:
            path = Path(tmp) / (Path(snap.name).name or "snapshot")   # its name, as uploaded
            with errors(cfg.url, where, f"download snapshot {snap.name}"):
                download(cfg, collection, snap, path)
            with errors(cfg.url, where, f"recover {collection} from snapshot {snap.name}"):
                upload(client, collection, path, snap.checksum)
            path.unlink()
