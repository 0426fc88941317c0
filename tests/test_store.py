"""The store on both backends: Qdrant Edge shards under tmp_path, and the server backend over
qdrant-client's local mode (Qdrant's own implementation of the API, in-process) always, a real
Qdrant server too when QDRANT_URL is set. The same suite runs on each, so callers never need to
branch on backend; the few tests that need a real server say so (conftest.REAL_SERVER)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
from conftest import STORE_KINDS, drop, store_place
from phisearch.indexer.store import (
    SCHEMA_VERSION,
    MetaMismatch,
    PointData,
    StoreBusy,
    StoreConfig,
    StoreError,
    backend,
    open_store,
    point_id,
)

N, DIM = 200, 32
META = {"model_sha256": "a" * 64, "readout": "mid", "readout_sha256": "b" * 64, "sigma": 0.2,
        "draws": 4, "seed": 0, "schema_version": SCHEMA_VERSION, "dim": DIM,
        "checkpoint": "small64"}


@pytest.fixture(scope="module", params=STORE_KINDS)
def base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> StoreConfig:
    """Where a backend's test collections live: an Edge folder, the server backend over
    qdrant-client's local mode, or the QDRANT_URL server (conftest.STORE_KINDS)."""
    return store_place(request, request.param, tmp_path_factory.mktemp("store"), busy_wait=0.5)


EDGE_ONLY = pytest.mark.parametrize("base", ["edge"], indirect=True)   # Edge's folder and lock


def fresh(base: StoreConfig) -> StoreConfig:
    return replace(base, collection=f"phisearch_test_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def cfg(base: StoreConfig) -> Iterator[StoreConfig]:
    """A unique collection per test, deleted afterwards."""
    c = fresh(base)
    yield c
    drop(c)   # Edge collections go with tmp_path


def make_points(n: int = N, seed: int = 0) -> tuple[list[PointData], np.ndarray]:
    """Non-negative vectors, ~30% non-zero: the sparse part is the non-zero channels."""
    rng = np.random.default_rng(seed)
    dense = (rng.random((n, DIM)) * (rng.random((n, DIM)) < 0.3)).astype(np.float32)
    pts = []
    for i, v in enumerate(dense):
        nz = np.flatnonzero(v)
        pts.append(PointData(
            id=point_id("t", f"k{i:04d}"), vector=v, sparse_indices=nz.tolist(),
            sparse_values=v[nz].tolist(),
            payload={"dataset": "t", "key": f"k{i:04d}", "label": i % 10,
                     "split": "train" if i < 150 else "val", "shard": f"s{i // 50}",
                     "phi_norm": float(np.linalg.norm(v))}))
    return pts, dense


def same_payload(got: dict, want: dict) -> bool:
    """Equal, floats to 1e-12: Edge may round a payload float by 1 ulp (see store.py)."""
    return got.keys() == want.keys() and all(
        got[k] == pytest.approx(v, rel=1e-12) if isinstance(v, float) else got[k] == v
        for k, v in want.items())


@pytest.fixture
def store(cfg):
    with open_store(cfg) as s:
        s.ensure(META)
        yield s


@pytest.fixture
def filled(store):
    pts, dense = make_points()
    store.upsert(pts)
    return store, pts, dense


@pytest.fixture(scope="module")
def ro(base: StoreConfig):
    """One filled collection shared by the tests that only read (ensure costs ~1 s on Edge)."""
    c = fresh(base)
    pts, dense = make_points()
    with open_store(c) as s:
        s.ensure(META)
        s.upsert(pts)
        yield s, pts, dense
        if c.url:
            s.drop()


def test_point_id_is_deterministic():
    assert point_id("imagenette", "n01440764_1") == point_id("imagenette", "n01440764_1")
    assert point_id("a", "k") != point_id("b", "k")
    uuid.UUID(point_id("a", "k"))


def test_meta_round_trip_survives_reopen(cfg):
    with open_store(cfg) as s:
        assert s.meta() is None
        assert cfg.collection not in backend(cfg).collections()
        assert s.count() == 0 and s.search(np.zeros(DIM)) == [] and s.get_doc("shards") is None
        with pytest.raises(StoreError, match="does not exist"):
            s.upsert(make_points(2)[0])
        if cfg.url is None:   # opening (and reading) creates nothing on disk
            assert not os.path.exists(os.path.join(cfg.path, cfg.collection))
        s.ensure(META)
        assert s.meta() == META
        s.ensure(dict(META, checkpoint="renamed"))   # non-identity keys don't matter
    with open_store(cfg) as s:
        assert s.meta() == META
        assert cfg.collection in backend(cfg).collections()
        assert s.count() == 0


@pytest.mark.parametrize("key,value", [("model_sha256", "c" * 64), ("sigma", 0.1)])
def test_meta_mismatch_names_the_key(store, key, value):
    with pytest.raises(MetaMismatch) as ei:
        store.ensure(dict(META, **{key: value}))
    msg = str(ei.value)
    assert key in msg and repr(META[key]) in msg and repr(value) in msg
    assert "\n" not in msg


def test_upsert_is_idempotent(filled):
    store, pts, _ = filled
    assert store.count() == N
    store.upsert(pts[:50])
    assert store.count() == N


def test_dense_search_matches_numpy(ro):
    store, pts, dense = ro
    for p in (0, 17, 123):
        hits = store.search(dense[p], limit=10)
        assert hits[0].id == pts[p].id and hits[0].distance == pytest.approx(0.0, abs=1e-4)
        want = np.sort(np.linalg.norm(dense - dense[p], axis=1))[:10]
        np.testing.assert_allclose([h.distance for h in hits], want, atol=1e-4)
        by_id = {q.id: i for i, q in enumerate(pts)}
        for h in hits:   # each score is that point's own distance
            assert h.distance == pytest.approx(np.linalg.norm(dense[by_id[h.id]] - dense[p]), abs=1e-4)
    assert hits[0].payload["key"] == "k0123" and hits[0].vector is None


def test_search_with_vectors(ro):
    store, pts, dense = ro
    h = store.search(dense[5], limit=1, with_vectors=True)[0]
    np.testing.assert_allclose(h.vector, dense[5], atol=1e-6)
    assert h.sparse[0] == pts[5].sparse_indices


def test_sparse_search_orders_by_dot_product(ro):
    store, pts, dense = ro
    q_idx, q_val = [1, 4, 9, 20, 31], [0.5, 1.0, 0.25, 2.0, 0.75]
    q = np.zeros(DIM, np.float32)
    q[q_idx] = q_val
    dots = dense @ q
    hits = store.search_sparse(q_idx, q_val, limit=10)
    np.testing.assert_allclose([h.dot for h in hits], np.sort(dots)[::-1][:10], atol=1e-4)
    by_id = {p.id: i for i, p in enumerate(pts)}
    for h in hits:
        assert h.dot == pytest.approx(dots[by_id[h.id]], abs=1e-4)
    assert store.search_sparse([], []) == []


def test_filters(ro):
    store, _, dense = ro
    assert store.count({"label": 3}) == 20
    assert store.count({"label": [1, 2, 3]}) == 60
    assert store.count({"label": {"gte": 2, "lte": 4}}) == 60
    assert store.count({"split": "val"}) == 50
    assert store.count({"split": "train", "label": [0, 1]}) == 30
    assert store.count({"shard": ["s0", "s3"], "label": {"lt": 5}}) == 50
    hits = store.search(dense[0], limit=30, filter={"label": [2, 7]})
    assert len(hits) == 30 and {h.payload["label"] for h in hits} <= {2, 7}
    hits = store.search_sparse([0, 1], [1.0, 1.0], limit=5, filter={"split": "val"})
    assert hits and all(h.payload["split"] == "val" for h in hits)
    with pytest.raises(StoreError, match="range"):
        store.count({"label": {"between": 3}})


def test_retrieve_returns_what_was_written(ro):
    store, pts, dense = ro
    ids = [pts[i].id for i in (3, 7, 11)] + [point_id("t", "missing")]
    hits = store.retrieve(ids)
    assert [h.id for h in hits] == ids[:3]
    for h, i in zip(hits, (3, 7, 11)):
        assert h.distance is None and h.dot is None and same_payload(h.payload, pts[i].payload)
        np.testing.assert_allclose(h.vector, dense[i], atol=1e-6)
        assert h.sparse[0] == pts[i].sparse_indices
        np.testing.assert_allclose(h.sparse[1], pts[i].sparse_values, atol=1e-6)
    assert store.retrieve(ids[:1], with_vectors=False)[0].vector is None
    assert store.retrieve([]) == []


def test_scroll_yields_every_point_once(ro):
    store, pts, _ = ro
    ids = [h.id for h in store.scroll(batch=37)]
    assert len(ids) == N and set(ids) == {p.id for p in pts}
    val = list(store.scroll({"split": "val"}, with_vectors=True, batch=16))
    assert len(val) == 50 and all(h.vector is not None and h.vector.shape == (DIM,) for h in val)


def test_set_payload_merges_and_filters(filled):
    store, pts, _ = filled
    store.set_payload({p.id: {"cluster_id": i % 3, "cluster_prob": 0.5} for i, p in enumerate(pts)})
    store.set_payload({pts[0].id: {"cluster_id": -1}})
    h = store.retrieve([pts[0].id, pts[1].id], with_vectors=False)
    assert h[0].payload["cluster_id"] == -1 and h[0].payload["label"] == 0
    assert same_payload(h[1].payload, dict(pts[1].payload, cluster_id=1, cluster_prob=0.5))
    assert store.count({"cluster_id": 1}) == 67
    assert store.count({"cluster_id": -1}) == 1
    assert store.count({"cluster_id": 2, "label": 2}) == 7   # i % 10 == 2 and i % 3 == 2
    assert store.count() == N


def test_delete_by_ids_and_filter(filled):
    store, pts, _ = filled
    assert store.delete(ids=[pts[0].id, pts[1].id, point_id("t", "missing")]) == 2
    assert store.count() == N - 2
    assert store.delete(filter={"label": 3}) == 20
    assert store.delete(filter={"label": 3}) == 0
    assert store.delete(ids=[pts[2].id], filter={"label": 9}) == 0   # both must hold
    assert store.delete(ids=[]) == 0
    assert store.count() == N - 22 and store.count({"label": 3}) == 0
    with pytest.raises(StoreError):
        store.delete()


def test_docs_round_trip_and_are_not_points(filled, cfg):
    store, _, _ = filled
    assert store.get_doc("shards") is None
    doc = {"a.tar": {"size": 123, "mtime": 1.5, "done": True}, "b.tar": {"size": 7}}
    store.put_doc("shards", doc)
    store.put_doc("clusters", {"method": "hdbscan", "centroids": np.zeros((2, 3))})
    assert store.get_doc("shards") == doc
    store.put_doc("shards", {"a.tar": {"size": 1}})   # atomic replace, not merge
    assert store.get_doc("shards") == {"a.tar": {"size": 1}}
    assert store.get_doc("clusters")["centroids"] == [[0.0] * 3] * 2
    assert store.count() == N and len(list(store.scroll())) == N
    assert cfg.collection in backend(cfg).collections()
    with pytest.raises(StoreError, match="invalid doc name"):
        store.put_doc("../x", {})
    store.close()
    with open_store(cfg) as s:
        assert s.get_doc("shards") == {"a.tar": {"size": 1}} and s.count() == N


@EDGE_ONLY
def test_edge_layout(filled, cfg):
    store, _, _ = filled
    store.put_doc("last_run", {"indexed": N})
    d = os.path.join(cfg.path, cfg.collection)
    assert sorted(os.listdir(d)) == ["docs", "meta.json", "shard"]
    assert os.listdir(os.path.join(d, "docs")) == ["last_run.json"]


@EDGE_ONLY
def test_edge_second_open_is_busy_until_closed(cfg):
    first = open_store(cfg)
    first.ensure(META)
    first.upsert(make_points(5)[0])
    with pytest.raises(StoreBusy, match="in use by another process"):   # after busy_wait
        open_store(cfg)
    first.close()
    with open_store(cfg) as s:
        assert s.count() == 5


@EDGE_ONLY
@pytest.mark.parametrize("left", ["empty", "partial_segment"])
def test_edge_create_killed_before_meta_is_redone(cfg, left):
    """A build killed while the Edge shard was being created (seen at a random kill time):
    the shard folder exists, with no segments or half of one, and no meta.json. Opening must
    not fail ('edge config is not provided'): the half-made shard holds no points, status
    counts 0, and the next ensure() creates it again."""
    d = os.path.join(cfg.path, cfg.collection)
    os.makedirs(os.path.join(d, "shard", "wal"))
    with open(os.path.join(d, ".creating"), "w"):   # what ensure() leaves while creating
        pass
    if left == "partial_segment":
        seg = os.path.join(d, "shard", "segments", "0b5e1a2c-half")
        os.makedirs(seg)
        with open(os.path.join(seg, "segment.json"), "w") as f:
            f.write('{"version": 1, "config": {"vector_da')   # cut mid-write
    with open_store(cfg) as s:
        assert s.count() == 0 and s.meta() is None
        s.ensure(META)
        s.upsert(make_points(5)[0])
    with open_store(cfg) as s:
        assert s.count() == 5 and s.meta()["dim"] == DIM
    assert sorted(os.listdir(d)) == ["meta.json", "shard"]   # the marker went with meta.json


@EDGE_ONLY
def test_edge_shard_without_meta_or_marker_is_never_deleted(cfg):
    """A shard folder with points and no meta.json that phisearch did not start creating is
    not ours: opening leaves it, ensure() refuses it, its points stay."""
    with open_store(cfg) as s:
        s.ensure(META)
        s.upsert(make_points(5)[0])
    d = os.path.join(cfg.path, cfg.collection)
    with open(os.path.join(d, "meta.json")) as f:
        meta = f.read()
    os.remove(os.path.join(d, "meta.json"))
    with open_store(cfg) as s:
        assert s.count() == 0   # not opened: not a phisearch collection until ensure() says
        with pytest.raises(StoreError, match="holds points but no meta.json"):
            s.ensure(META)
    with open(os.path.join(d, "meta.json"), "w") as f:   # put back: every point is still there
        f.write(meta)
    with open_store(cfg) as s:
        assert s.count() == 5


HOLDER = """
import sys
from phisearch.indexer.store import StoreConfig, open_store
s = open_store(StoreConfig(path=sys.argv[1], collection=sys.argv[2]))
print(s.count(), flush=True)
sys.stdin.read()   # held until the test kills it
"""


@EDGE_ONLY
def test_edge_held_by_another_process_then_killed(cfg):
    """Another process holds the shard: StoreBusy; once it dies (even SIGKILL), it opens."""
    with open_store(cfg) as s:
        s.ensure(META)
        s.upsert(make_points(7)[0])
    child = subprocess.Popen([sys.executable, "-c", HOLDER, cfg.path, cfg.collection],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "7"
        with pytest.raises(StoreBusy):
            open_store(cfg)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with open_store(cfg) as s:
        assert s.count() == 7


def test_server_upsert_retries_then_fails_clearly(monkeypatch, caplog):
    """A server that goes away mid-run: upsert retries with backoff, then one clear error."""
    from phisearch.indexer.store import server as store_server
    from qdrant_client import QdrantClient

    monkeypatch.setattr(store_server, "BACKOFF", 0.01)
    cfg = StoreConfig(url="http://127.0.0.1:9")
    client = QdrantClient(url=cfg.url, timeout=2, check_compatibility=False)
    s = store_server.ServerStore(cfg, client, "c")   # no connect check: the server is gone
    s._dim = DIM
    with caplog.at_level(logging.WARNING), pytest.raises(StoreError, match="cannot reach"):
        s.upsert(make_points(3)[0])
    assert sum("retry" in r.message for r in caplog.records) == store_server.RETRIES - 1


def test_drop_removes_collection(cfg):
    with open_store(cfg) as s:
        s.ensure(META)
        s.upsert(make_points(3)[0])
        s.drop()
        assert s.meta() is None and s.count() == 0
    with backend(cfg) as b:
        assert cfg.collection not in b.collections()


def test_unreachable_server_is_a_clear_error():
    with pytest.raises(StoreError, match=r"cannot reach Qdrant at http://127\.0\.0\.1:9"):
        open_store(StoreConfig(url="http://127.0.0.1:9", timeout=2))


def test_no_store_given():
    with pytest.raises(StoreError, match="no store given"):
        open_store(StoreConfig())


def test_point_id_is_pinned_to_the_contract_formula():
    """uuid5(uuid5(NAMESPACE_URL, "phisearch"), f"{dataset}/{key}"): other services compute it."""
    assert point_id("imagenette-64", "n01440764_10026") == "3f712e21-e14d-53fe-b3c8-fcad9a2efb79"
