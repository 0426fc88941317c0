"""The server backend's own calls, beyond the shared store suite (test_store.py runs that on it):
how many client calls a read costs, an injected client left open, snapshot restore through the
HTTP API (checked against a stand-in for the four endpoints it uses, through qdrant-client's
real HTTP stack), and what only a real Qdrant server can show (QDRANT_URL; skipped here)."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from email.parser import BytesParser
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from conftest import QDRANT_URL, REAL_SERVER, drop, store_place
from phisearch.indexer.manage.snapshots import create, list_snapshots, restore
from phisearch.indexer.store import INDEXES, StoreConfig, StoreError, backend, open_store
from phisearch.indexer.store.server import ServerBackend
from test_store import META, N, make_points, same_payload


class Counting:
    """A qdrant-client whose calls are counted; the local-mode client underneath answers them."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kw: Any) -> Any:
            self.calls[name] += 1
            return attr(*args, **kw)
        return call


def test_each_read_is_one_call_and_never_asks_collection_exists(qdrant_local):
    """A read is one request: no `collection_exists` first, not even for a collection that does
    not exist yet (it answers empty from the 404 instead)."""
    counting = Counting(qdrant_local)
    cfg = StoreConfig(url="http://counting.invalid:6333", collection=f"c_{uuid.uuid4().hex[:8]}")
    b = ServerBackend(cfg, client=counting)          # the constructor's injection
    assert counting.calls == {"get_collections": 1}   # the connect check
    pts, dense = make_points()
    reads = {   # read -> (the one client call it makes, what it returns on the built collection)
        "meta": (lambda s: s.meta(), "retrieve", META),
        "get_doc": (lambda s: s.get_doc("shards"), "retrieve", {"a.tar": {"size": 1}}),
        "count": (lambda s: s.count({"label": 3}), "count", 20),
        "search": (lambda s: [h.id for h in s.search(dense[7], limit=1)], "query_points",
                   [pts[7].id]),
        "search_sparse": (lambda s: len(s.search_sparse([1, 2], [1.0, 1.0], limit=4)),
                          "query_points", 4),
        "retrieve": (lambda s: [h.id for h in s.retrieve([pts[3].id])], "retrieve",
                     [pts[3].id]),
        "scroll": (lambda s: len(list(s.scroll())), "scroll", N),
    }
    empty = {"meta": None, "get_doc": None, "count": 0, "search": [], "search_sparse": 0,
             "retrieve": [], "scroll": 0}
    store = b.open()
    assert counting.calls["get_aliases"] == 1         # an alias resolves once, at open
    for name, (read, call, _) in reads.items():        # nothing built yet
        counting.calls.clear()
        assert read(store) == empty[name], name
        assert counting.calls == {call: 1}, (name, counting.calls)
    store.ensure(META)
    store.upsert(pts)
    store.put_doc("shards", {"a.tar": {"size": 1}})
    for name, (read, call, want) in reads.items():
        counting.calls.clear()
        assert read(store) == want, name
        assert counting.calls == {call: 1}, (name, counting.calls)
    store.drop()
    store.close()
    b.close()
    # an injected client is its owner's to close: still open here
    assert cfg.collection not in [c.name for c in qdrant_local.get_collections().collections]


def test_local_mode_cannot_snapshot_and_says_so(qdrant_local, tmp_path, request):
    """The one API local mode lacks: a clear one-line StoreError, not a traceback."""
    cfg = store_place(request, "server-local", tmp_path)
    with open_store(cfg) as s:
        s.ensure(META)
    try:
        with pytest.raises(StoreError, match="not supported in the local Qdrant") as ei:
            create(cfg)
        assert "\n" not in str(ei.value)
        assert list_snapshots(cfg) == []
        with pytest.raises(StoreError, match="no snapshot nope"):
            restore(cfg, "nope")
    finally:
        drop(cfg)


# -- snapshot restore through the API ------------------------------------------------------------
SNAP = b"\x1f\x8b pretend snapshot bytes " * 1000


class _SnapshotEndpoints(http.server.BaseHTTPRequestHandler):
    """The Qdrant REST endpoints a restore touches, recording each request. Collection `col` has
    snapshot `col-1.snapshot`; its companion `col__phisearch_meta` has one taken just before
    (not it) and one just after (the one restore must pick)."""

    log: list[dict]
    files: dict[str, bytes]
    listed_checksums: dict[str, str]

    def _send(self, code: int, body: Any) -> None:
        data = body if isinstance(body, bytes) else json.dumps(
            {"result": body, "status": "ok", "time": 0.0}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream" if isinstance(body, bytes)
                         else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self, body: bytes = b"") -> dict:
        url = urlparse(self.path)
        entry = {"method": self.command, "path": url.path, "query": parse_qs(url.query),
                 "api_key": self.headers.get("api-key"), "body": body,
                 "content_type": self.headers.get("Content-Type", "")}
        self.log.append(entry)
        return entry

    def do_GET(self) -> None:
        path = self._record()["path"]
        if path == "/collections":
            return self._send(200, {"collections": [{"name": "col"},
                                                    {"name": "col__phisearch_meta"}]})
        if path == "/aliases":
            return self._send(200, {"aliases": []})
        if path.endswith("/exists"):   # the companion was dropped since: no writer to wait for
            return self._send(200, {"exists": False})
        if path.endswith("/snapshots"):
            coll = path.split("/")[2]
            snaps = {"col": [("col-1.snapshot", "2026-12-01T10:00:05")],
                     "col__phisearch_meta": [("meta-0.snapshot", "2026-12-01T10:00:00"),
                                             ("meta-1.snapshot", "2026-12-01T10:00:06")]}[coll]
            return self._send(200, [{"name": n, "creation_time": t, "size": len(self.files.get(n, b"")),
                                     "checksum": self.listed_checksums[n]} for n, t in snaps])
        name = path.rsplit("/", 1)[-1]
        if name in self.files:
            return self._send(200, self.files[name])
        return self._send(404, b'{"status":{"error":"Not found: snapshot"}}')

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = self._record(body)["path"]
        if path.endswith("/points/count"):
            return self._send(200, {"count": 7})
        if path.endswith("/snapshots/upload"):
            return self._send(200, True)
        return self._send(404, b'{"status":{"error":"unexpected"}}')

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def snapshot_endpoints() -> Iterator[tuple[str, type[_SnapshotEndpoints]]]:
    files = {"col-1.snapshot": SNAP, "meta-0.snapshot": b"old meta",
             "meta-1.snapshot": b"meta taken with col-1"}
    handler = type("Handler", (_SnapshotEndpoints,), {
        "log": [], "files": files,
        "listed_checksums": {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()


def uploaded_file(entry: dict) -> tuple[str, str, bytes]:
    """The multipart form field's name, file name and content of an upload request."""
    msg = BytesParser().parsebytes(b"Content-Type: " + entry["content_type"].encode() +
                                   b"\r\n\r\n" + entry["body"])
    part, = msg.get_payload()
    return (part.get_param("name", header="content-disposition"), part.get_filename(),
            part.get_payload(decode=True))


@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection")
def test_restore_downloads_each_snapshot_and_uploads_it_back(snapshot_endpoints):
    """No server path is assumed: each snapshot file comes down through the API and goes back
    up to /snapshots/upload with priority=snapshot and its checksum; the companion's snapshot is
    the one taken with the collection's, not an older one."""
    url, handler = snapshot_endpoints
    cfg = StoreConfig(url=url, api_key="sekret", collection="col")
    out = restore(cfg, "col-1.snapshot")
    assert out == {"name": "col-1.snapshot", "collection": "col", "points": 7}
    calls = [(e["method"], e["path"]) for e in handler.log]
    assert calls == [
        ("GET", "/collections"), ("GET", "/aliases"),
        ("GET", "/collections/col__phisearch_meta/exists"),
        ("GET", "/collections/col/snapshots"),
        ("GET", "/collections/col__phisearch_meta/snapshots"),
        ("GET", "/collections/col/snapshots/col-1.snapshot"),
        ("POST", "/collections/col/snapshots/upload"),
        ("GET", "/collections/col__phisearch_meta/snapshots/meta-1.snapshot"),
        ("POST", "/collections/col__phisearch_meta/snapshots/upload"),
        ("POST", "/collections/col/points/count")]
    assert all(e["api_key"] == "sekret" for e in handler.log)
    uploads = [e for e in handler.log if e["path"].endswith("/upload")]
    for entry, name in zip(uploads, ("col-1.snapshot", "meta-1.snapshot")):
        assert entry["query"] == {"wait": ["true"], "priority": ["snapshot"],
                                  "checksum": [handler.listed_checksums[name]]}
        assert uploaded_file(entry) == ("snapshot", name, handler.files[name])


def test_restore_refuses_a_download_that_does_not_match_its_checksum(snapshot_endpoints):
    url, handler = snapshot_endpoints
    handler.files["col-1.snapshot"] = SNAP[:-1]   # cut short on the way
    with pytest.raises(StoreError, match=r"col-1\.snapshot of col came back with sha256") as ei:
        restore(StoreConfig(url=url, collection="col"), "col-1.snapshot")
    assert "\n" not in str(ei.value)
    assert not [e for e in handler.log if e["path"].endswith("/upload")]   # nothing replaced
    del handler.files["col-1.snapshot"]                                    # gone from the server
    with pytest.raises(StoreError, match=r"refused download snapshot col-1\.snapshot: HTTP 404"):
        restore(StoreConfig(url=url, collection="col"), "col-1.snapshot")


# -- what only a real server shows --------------------------------------------------------------
@pytest.fixture
def real_server(request, tmp_path) -> Iterator[StoreConfig]:
    cfg = store_place(request, "server-url", tmp_path)
    yield cfg
    drop(cfg)


@pytest.mark.server
@pytest.mark.skipif(not QDRANT_URL, reason=REAL_SERVER + "qdrant-client's local mode has no "
                    "snapshots (create, download, upload and recover)")
def test_snapshot_remove_half_restore_on_a_real_server(real_server):
    cfg = real_server
    pts, dense = make_points()
    with open_store(cfg) as s:
        s.ensure(META)
        s.upsert(pts)
        s.put_doc("shards", {"a.tar": {"size": 1}})
    info = create(cfg)
    assert info["points"] == N and info["name"] in [x["name"] for x in list_snapshots(cfg)]
    with open_store(cfg) as s:
        assert s.delete(ids=[p.id for p in pts[:N // 2]]) == N // 2
        s.put_doc("shards", {})
    out = restore(cfg, info["name"])
    assert out["points"] == N
    with open_store(cfg) as s:
        assert s.meta() == META and s.get_doc("shards") == {"a.tar": {"size": 1}}
        got = {h.id: h for h in s.scroll(with_vectors=True)}
        assert set(got) == {p.id for p in pts}
        for p, v in zip(pts, dense):
            assert same_payload(got[p.id].payload, p.payload)
            np.testing.assert_allclose(got[p.id].vector, v, atol=1e-6)


@pytest.mark.server
@pytest.mark.skipif(not QDRANT_URL, reason=REAL_SERVER + "qdrant-client's local mode ignores "
                    "payload indexes (its payload_schema stays empty)")
def test_payload_indexes_on_a_real_server(real_server):
    from qdrant_client import QdrantClient

    with open_store(real_server) as s:
        s.ensure(META)
    client = QdrantClient(url=real_server.url, api_key=real_server.api_key)
    schema = client.get_collection(real_server.collection).payload_schema
    assert {k: v.data_type.value for k, v in schema.items()} == dict(INDEXES)
    with backend(real_server) as b:
        assert real_server.collection in b.collections()
