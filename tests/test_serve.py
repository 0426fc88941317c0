"""idx serve over real HTTP on loopback: uvicorn in a background thread (and once as the real
`idx serve` process) against an Edge store built from the mini shard with a tiny untrained model."""

from __future__ import annotations

import io
import itertools
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from conftest import SERVER_KINDS, drop, store_place
from phisearch.indexer.ingest.pipeline import BuildConfig, build
from phisearch.indexer.manage.cluster import ClusterConfig, cluster
from phisearch.indexer.model.config import PhiConfig
from phisearch.indexer.sources import images
from phisearch.indexer.sources.shards import read_shard
from phisearch.indexer.store import StoreBusy, StoreConfig, open_store
from phisearch.search.serve import create_app
from PIL import Image

MAX_BYTES = 100_000   # the mini shard's JPEGs are ~2 kB; a small limit keeps the 413 test cheap


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app) -> Iterator[str]:
    """Run the app with uvicorn on a free loopback port in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def built(tmp_path_factory, mini_shard, mini_store) -> tuple[StoreConfig, list[dict]]:
    """The 100 mini images in an Edge store (tiny untrained model, 2 draws: a copy of
    conftest.mini_store), k-means clustered."""
    root = tmp_path_factory.mktemp("serve")
    shutil.copytree(mini_store, root / "store")
    cfg = StoreConfig(path=str(root / "store"), collection="phisearch")
    cluster(cfg, ClusterConfig(method="kmeans", k=3, preprocess="raw"))
    raws = [r for r in read_shard(mini_shard) if isinstance(r, dict)][:4]
    return cfg, raws


@pytest.fixture(scope="module")
def base_url(built) -> Iterator[str]:
    cfg, _ = built
    with serving(create_app(cfg, max_bytes=MAX_BYTES, busy_wait=0.5)) as url:
        yield url


def png_of(jpg: bytes) -> bytes:
    """The decoded 64x64 pixels of a stored sample, re-encoded losslessly."""
    buf = io.BytesIO()
    Image.fromarray(images.decode(jpg)).save(buf, format="PNG")
    return buf.getvalue()


def stored(cfg: StoreConfig, key: str):
    with open_store(cfg) as st:
        hit, = list(st.scroll({"key": key}, with_vectors=True))
        return hit, st.meta()


def test_healthz_reports_the_collection(built, base_url):
    cfg, _ = built
    r = httpx.get(f"{base_url}/healthz", timeout=30)
    assert r.status_code == 200, r.text
    h = r.json()
    with open_store(cfg) as st:
        meta = st.meta()
    assert h["status"] == "ok" and h["backend"] == "edge" and h["points"] == 100
    assert h["model_sha256"] == meta["model_sha256"] and h["draws"] == 2 and h["sigma"] == 0.2
    assert h["model_loaded"] is True   # warmed at start-up, once


def test_phi_of_stored_pixels_equals_the_stored_vector(built, base_url):
    """Same pixels -> same φ (CONTRACT): an upload of a stored image's PNG reproduces its point."""
    cfg, raws = built
    for i, raw in enumerate(raws[:3]):
        png = png_of(raw["jpg"])
        if i == 0:   # raw body
            r = httpx.post(f"{base_url}/phi", content=png, timeout=60,
                           headers={"content-type": "image/png"})
        else:        # multipart, any field name
            r = httpx.post(f"{base_url}/phi", files={"image" if i == 1 else "file":
                                                     ("x.png", png, "image/png")}, timeout=60)
        assert r.status_code == 200, r.text
        out = r.json()
        hit, meta = stored(cfg, raw["__key__"])
        # one image alone vs in a build's batch: the last float32 bits differ by BLAS path (seen
        # 2e-6 on an AVX-512 host), far below what a wrong model or readout makes
        np.testing.assert_allclose(out["phi"], hit.vector, rtol=0, atol=1e-5)
        idx, vals = hit.sparse
        assert out["phi_sparse"]["indices"] == sorted(idx)
        np.testing.assert_allclose(out["phi_sparse"]["values"],
                                   np.asarray(vals)[np.argsort(idx)], rtol=1e-5, atol=1e-6)
        for key in ("model_sha256", "readout", "sigma", "draws", "seed"):
            assert out[key] == meta[key], key
        assert out["dim"] == meta["dim"] == len(out["phi"])


def test_search_finds_the_image_itself_first(built, base_url):
    cfg, raws = built
    raw = raws[1]
    r = httpx.post(f"{base_url}/search", params={"k": 5}, files={"file": ("q.jpg", raw["jpg"])},
                   timeout=60)
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert len(hits) == 5
    assert set(hits[0]) >= {"id", "key", "label", "label_name", "distance", "cluster_id"}
    assert hits[0]["key"] == raw["__key__"] and hits[0]["distance"] < 1e-3
    assert all(a["distance"] <= b["distance"] for a, b in itertools.pairwise(hits))
    own, _ = stored(cfg, raw["__key__"])
    assert hits[0]["id"] == own.id and hits[0]["cluster_id"] == own.payload["cluster_id"]
    # filters: label and cluster_id, as idx query --label / --cluster
    label = own.payload["label"]
    other = (label + 1) % 10
    r = httpx.post(f"{base_url}/search", params={"k": 20, "label": other}, content=raw["jpg"],
                   timeout=60)
    hits = r.json()["hits"]
    assert len(hits) == 10 and all(h["label"] == other for h in hits)   # 10 per class
    c = own.payload["cluster_id"]
    r = httpx.post(f"{base_url}/search", params={"k": 100, "cluster": c, "label": label},
                   content=raw["jpg"], timeout=60)
    hits = r.json()["hits"]
    with open_store(cfg) as st:
        assert len(hits) == st.count({"cluster_id": c, "label": label}) >= 1
    assert hits[0]["key"] == raw["__key__"]
    assert httpx.post(f"{base_url}/search", params={"k": 0}, content=raw["jpg"]).status_code == 422
    for big in (2**63, -(2**63) - 1, 10**20):   # past Qdrant's 64-bit integers: 422, no 500
        for name in ("label", "cluster"):
            r = httpx.post(f"{base_url}/search", params={name: big}, content=raw["jpg"])
            assert r.status_code == 422, (name, big, r.text)
    r = httpx.post(f"{base_url}/search", params={"label": 2**63 - 1}, content=raw["jpg"])
    assert r.status_code == 200 and r.json()["hits"] == []


def test_oversize_body_is_413(base_url):
    big = bytes(MAX_BYTES + 1)
    r = httpx.post(f"{base_url}/phi", content=big, timeout=30)
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    assert r.json()["max_bytes"] == MAX_BYTES

    def chunks():   # no Content-Length: the limit holds while streaming
        for _ in range(4):
            yield bytes(MAX_BYTES // 3)

    r = httpx.post(f"{base_url}/search", content=chunks(), timeout=30)
    assert r.status_code == 413 and "over the limit" in r.json()["message"]


def test_bad_images_are_400_or_422_with_a_reason(base_url):
    r = httpx.post(f"{base_url}/phi", content=b"this is not an image\n" * 20, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"] == "bad_image" and r.json()["reason"] == "not_an_image"
    r = httpx.post(f"{base_url}/search", content=b"", timeout=30)
    assert r.status_code == 400 and r.json()["reason"] == "empty"
    tiny = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tiny, format="PNG")
    r = httpx.post(f"{base_url}/phi", files={"file": ("t.png", tiny.getvalue())}, timeout=30)
    assert r.status_code == 422 and r.json()["reason"] == "too_small"
    r = httpx.post(f"{base_url}/phi", data={"note": "no file here"}, files={}, timeout=30,
                   headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 400 and r.json()["error"] in ("no_file", "bad_form")


def test_busy_edge_store_is_503_and_serve_hands_the_store_over(built, base_url):
    """Another process that asks for the store (as idx build does) gets it from serve, which
    holds it otherwise; meanwhile requests get 503 busy with Retry-After (after serve's
    busy_wait, not never: the request's timeout bounds that); released -> 200 again."""
    cfg, raws = built
    assert httpx.get(f"{base_url}/healthz", timeout=30).status_code == 200
    holder = open_store(StoreConfig(path=cfg.path, collection=cfg.collection, busy_wait=120))
    try:
        r = httpx.get(f"{base_url}/healthz", timeout=30)
        assert r.status_code == 503 and r.json()["status"] == "unhealthy"
        assert "in use by another process" in r.json()["message"]
        r = httpx.post(f"{base_url}/search", content=raws[0]["jpg"], timeout=30)
        assert r.status_code == 503 and r.json()["error"] == "busy"
        assert r.headers["retry-after"] == "1"
        assert httpx.post(f"{base_url}/phi", content=raws[0]["jpg"],
                          timeout=30).status_code == 503
    finally:
        holder.close()
    r = httpx.get(f"{base_url}/healthz", timeout=30)
    assert r.status_code == 200 and r.json()["points"] == 100


def test_missing_collection_is_503(tmp_path):
    app = create_app(StoreConfig(path=str(tmp_path / "empty"), collection="phisearch"))
    with serving(app) as url:
        r = httpx.get(f"{url}/healthz", timeout=30)
        assert r.status_code == 503 and "no collection" in r.json()["message"]
        assert "idx build" in r.json()["message"]
        r = httpx.post(f"{url}/search", content=b"x", timeout=30)
        assert r.status_code == 503 and r.json()["error"] == "no_collection"


def test_idx_serve_command_serves(built):
    """The real command line: `idx serve --store ... --port P` answers /healthz."""
    cfg, _ = built
    port = free_port()
    env = dict(os.environ, PHISEARCH_NO_PROGRESS="1")
    proc = subprocess.Popen([sys.executable, "-m", "phisearch.ui", "serve", "--store", cfg.path,
                             "--port", str(port), "--busy-wait", "0.5"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "idx serve did not start"
                time.sleep(0.2)
        assert r.status_code == 200 and r.json()["points"] == 100
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert Path(cfg.path, cfg.collection, "meta.json").is_file()


def test_hold_keeps_the_edge_handle_only_while_requests_come(built):
    """--hold S: the handle stays open between requests (an hour's hold: still held after
    them), and is released once idle for S (a short hold: released by itself, then another
    process can open the store)."""
    cfg, raws = built
    quick = StoreConfig(path=cfg.path, collection=cfg.collection, busy_wait=0)
    for hold in (3600.0, 0.3):
        with serving(create_app(cfg, hold_s=hold, warm=False)) as url:
            for _ in range(2):
                r = httpx.post(f"{url}/search", params={"k": 1}, content=raws[2]["jpg"],
                               timeout=60)
                assert r.status_code == 200 and r.json()["hits"][0]["key"] == raws[2]["__key__"]
            if hold > 60:
                with pytest.raises(StoreBusy):
                    open_store(quick)
                continue
            deadline = time.monotonic() + 120      # bounds a failure only
            while True:
                try:
                    with open_store(quick) as st:
                        assert st.count() == 100
                    break
                except StoreBusy:
                    assert time.monotonic() < deadline, "the idle handle was never released"
                    time.sleep(0.05)


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_serve_on_a_qdrant_server(built, mini_shard, kind, request, tmp_path):
    """The same endpoints over a server collection built by the pipeline: the server backend
    over qdrant-client's local mode here (uvicorn runs in this process), QDRANT_URL's too."""
    edge_cfg, raws = built
    with open_store(edge_cfg) as st:
        checkpoint = st.meta()["checkpoint"]
    cfg = store_place(request, kind, tmp_path)
    build(BuildConfig(data=(mini_shard,), store=cfg, checkpoint=checkpoint,
                      phi=PhiConfig(sigma=0.2, draws=2, seed=0), batch_size=50, workers=0,
                      device="cpu"))
    cluster(cfg, ClusterConfig(method="kmeans", k=3, preprocess="raw"))
    try:
        with serving(create_app(cfg)) as base:
            h = httpx.get(f"{base}/healthz", timeout=30).json()
            assert h["backend"] == "server" and h["points"] == 100
            r = httpx.post(f"{base}/search", params={"k": 3}, content=raws[0]["jpg"], timeout=60)
            assert r.status_code == 200 and r.json()["hits"][0]["key"] == raws[0]["__key__"]
            assert r.json()["hits"][0]["distance"] < 1e-3
            first = r.json()["hits"][0]
            # the same search on the Edge build of the same images and model: the same ranking
            with serving(create_app(edge_cfg, warm=False)) as edge_base:
                e = httpx.post(f"{edge_base}/search", params={"k": 10}, content=raws[0]["jpg"],
                               timeout=60).json()["hits"]
            s = httpx.post(f"{base}/search", params={"k": 10}, content=raws[0]["jpg"],
                           timeout=60).json()["hits"]
            assert [x["id"] for x in s] == [x["id"] for x in e]
            np.testing.assert_allclose([x["distance"] for x in s], [x["distance"] for x in e],
                                       atol=1e-4)
            # filters reach the server: label and cluster of the first hit
            r = httpx.post(f"{base}/search", params={"k": 100, "label": first["label"],
                                                     "cluster": first["cluster_id"]},
                           content=raws[0]["jpg"], timeout=60)
            hits = r.json()["hits"]
            with open_store(cfg) as st:
                n = st.count({"label": first["label"], "cluster_id": first["cluster_id"]})
            assert r.status_code == 200 and len(hits) == n >= 1
            assert all((x["label"], x["cluster_id"]) == (first["label"], first["cluster_id"])
                       for x in hits)
            r = httpx.post(f"{base}/search", params={"id": first["id"], "k": 3}, timeout=60)
            assert r.status_code == 200 and r.json()["hits"][0]["id"] == first["id"]
    finally:
        drop(cfg)
