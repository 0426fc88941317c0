"""idx export: an Edge collection copied into another Edge folder or through the server backend
(qdrant-client's local mode here; a real server too when QDRANT_URL is set), complete, resumable
after an interruption, refusing other models."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import SERVER_KINDS, drop, run_idx, store_place
from phisearch.indexer.ingest.pipeline import BuildConfig, build
from phisearch.indexer.manage import cluster as cluster_mod
from phisearch.indexer.manage.export import EXPORT_DOC, SIDE_DOCS, ExportConfig, export, meta_sha256
from phisearch.indexer.model import checkpoint as ckpt
from phisearch.indexer.model.config import PhiConfig
from phisearch.indexer.store import MetaMismatch, StoreConfig, StoreError, open_store


@pytest.fixture(scope="module")
def source(tmp_path_factory, mini_store) -> StoreConfig:
    """A real Edge collection: the mini shard (100 points; a copy of conftest.mini_store),
    k-means clustered."""
    root = tmp_path_factory.mktemp("src")
    shutil.copytree(mini_store, root / "store")
    cfg = StoreConfig(path=str(root / "store"), collection="phisearch")
    cluster_mod.cluster(cfg, cluster_mod.ClusterConfig(method="kmeans", k=4))
    return cfg


def snapshot(cfg: StoreConfig) -> dict[str, tuple]:
    """id -> (dense, sparse indices, sparse values, payload), read back from the store."""
    with open_store(cfg) as st:
        return {h.id: (h.vector, h.sparse[0], h.sparse[1], h.payload)
                for h in st.scroll(with_vectors=True)}


def assert_same(a: dict[str, tuple], b: dict[str, tuple]) -> None:
    assert set(a) == set(b)
    for pid, (dense, idx, vals, payload) in a.items():
        d2, i2, v2, p2 = b[pid]
        np.testing.assert_array_equal(dense, d2)
        assert dict(zip(idx, vals)) == dict(zip(i2, v2)), pid
        assert payload == p2, pid


def test_edge_to_edge_round_trip(source, tmp_path):
    dest = StoreConfig(path=str(tmp_path / "dest"), collection="copy")
    summary = export(ExportConfig(source=source, dest=dest, batch_size=32))
    assert summary["exported"] == 100 and summary["skipped_existing"] == 0
    assert summary["points"] == 100 and summary["complete"]
    assert sorted(summary["docs"]) == sorted(SIDE_DOCS)
    src = snapshot(source)
    assert all("cluster_id" in v[3] for v in src.values())
    assert_same(src, snapshot(dest))
    with open_store(source) as s, open_store(dest) as d:
        assert d.meta() == s.meta()
        for name in SIDE_DOCS:
            assert d.get_doc(name) == s.get_doc(name)
        assert d.get_doc(EXPORT_DOC)["source_meta_sha256"] == meta_sha256(s.meta())
        assert d.count({"label": 3}) == s.count({"label": 3}) == 10   # payload index works
        some = next(iter(src.values()))
        assert d.search(some[0], limit=1)[0].distance < 1e-4
    again = export(ExportConfig(source=source, dest=dest))
    assert again["exported"] == 0 and again["skipped_existing"] == 100


def test_interrupted_export_resumes_to_the_exact_set(source, tmp_path):
    dest = StoreConfig(path=str(tmp_path / "dest"), collection="phisearch")

    class Boom(Exception):
        pass

    def stop_after_two_pages(p: dict) -> None:
        if p["done"] >= 40:
            raise Boom

    with pytest.raises(Boom):
        export(ExportConfig(source=source, dest=dest, batch_size=20), stop_after_two_pages)
    with open_store(dest) as d:
        assert d.count() == 40
        assert d.get_doc("shards") is None   # docs come last: no resume record claims points
        assert d.get_doc(EXPORT_DOC)["complete"] is False
    part = export(ExportConfig(source=source, dest=dest, batch_size=30, limit=25))
    assert part["exported"] == 25 and not part["complete"] and part["points"] == 65
    assert part["skipped_existing"] == 40 and part["docs"] == []
    rest = export(ExportConfig(source=source, dest=dest, batch_size=30))
    assert rest["exported"] == 35 and rest["skipped_existing"] == 65 and rest["complete"]
    assert_same(snapshot(source), snapshot(dest))
    # a point whose payload changed in the source is copied again, not skipped
    with open_store(source) as s:
        first = next(s.scroll())
        pid, original = first.id, first.payload["cluster_id"]
        s.set_payload({pid: {"cluster_id": 99}})
    try:
        fix = export(ExportConfig(source=source, dest=dest))
        assert fix["exported"] == 1 and fix["skipped_existing"] == 99
        with open_store(dest) as d:
            assert d.retrieve([pid])[0].payload["cluster_id"] == 99
    finally:
        with open_store(source) as s:
            s.set_payload({pid: {"cluster_id": original}})   # the source is shared by the module


def test_refuses_a_destination_built_with_another_model(source, tmp_path, mini_shard):
    other = tmp_path / "other.safetensors"
    ckpt.save(ckpt.untrained("tiny", seed=2).model, other, preset_name="tiny")
    dest = StoreConfig(path=str(tmp_path / "dest"), collection="phisearch")
    build(BuildConfig(data=(mini_shard,), store=dest, checkpoint=str(other),
                      phi=PhiConfig(sigma=0.2, draws=2, seed=0), batch_size=50, workers=0,
                      device="cpu"))
    with pytest.raises(MetaMismatch, match="model_sha256"):
        export(ExportConfig(source=source, dest=dest))
    with pytest.raises(StoreError, match="same"):
        export(ExportConfig(source=source, dest=source))
    with pytest.raises(StoreError, match="nothing to export"):
        export(ExportConfig(source=StoreConfig(path=str(tmp_path / "none")), dest=dest))


def test_cli_export_json_and_errors(source, tmp_path):
    base = ["export", "--store", source.path, "--to-store", str(tmp_path / "d")]
    r = run_idx(*base, "--limit", "30", "--json")     # in this process (conftest.run_idx)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"exported", "skipped_existing", "seconds", "points"} <= set(out)
    assert out["exported"] == 30 and out["points"] == 30
    out = json.loads(run_idx(*base, "--json").stdout)
    assert (out["exported"], out["skipped_existing"], out["points"]) == (70, 30, 100)
    r = run_idx("export", "--store", source.path)
    assert r.returncode == 2 and "--to-url" in r.stderr
    r = run_idx("export", "--store", str(tmp_path / "empty"), "--to-store", str(tmp_path / "d2"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "nothing to export" in r.stderr


@pytest.fixture(params=SERVER_KINDS)
def server_dest(request, tmp_path) -> Iterator[StoreConfig]:
    """A fresh server collection: local mode here, QDRANT_URL's server too when set."""
    dest = store_place(request, request.param, tmp_path, collection=f"test_export_"
                       f"{uuid.uuid4().hex[:8]}")
    yield dest
    drop(dest)


def test_edge_to_server(source, server_dest):
    dest = server_dest
    first = export(ExportConfig(source=source, dest=dest, batch_size=32, limit=50))
    assert first["exported"] == 50 and not first["complete"]
    with open_store(dest) as d:
        assert d.count() == 50 and d.get_doc("shards") is None
    summary = export(ExportConfig(source=source, dest=dest, batch_size=32))
    assert summary["exported"] == 50 and summary["skipped_existing"] == 50
    assert summary["points"] == 100 and summary["complete"]
    assert_same(snapshot(source), snapshot(dest))
    with open_store(source) as s, open_store(dest) as d:
        assert d.meta() == s.meta()
        for name in SIDE_DOCS:
            assert d.get_doc(name) == s.get_doc(name)
        assert d.count({"label": 3}) == s.count({"label": 3}) == 10
        for c in range(4):
            assert d.count({"cluster_id": c}) == s.count({"cluster_id": c})
        some = next(s.scroll(with_vectors=True))
        assert [h.id for h in d.search(some.vector, limit=5)] == \
            [h.id for h in s.search(some.vector, limit=5)]
    again = export(ExportConfig(source=source, dest=dest))
    assert again["exported"] == 0 and again["skipped_existing"] == 100


def test_cli_export_edge_to_server(source, server_dest, monkeypatch):
    """`idx export --to-url` in-process (CliRunner), so local mode's injected client serves it."""
    from phisearch.ui.cli import app
    from typer.testing import CliRunner

    monkeypatch.setenv("PHISEARCH_NO_PROGRESS", "1")
    args = ["export", "--store", source.path, "--to-url", server_dest.url, "--to-collection",
            server_dest.collection, "--json"]
    res = CliRunner().invoke(app, [*args, "--limit", "30"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == dict(json.loads(res.stdout), exported=30, points=30)
    res = CliRunner().invoke(app, args)
    out = json.loads(res.stdout)
    assert (out["exported"], out["skipped_existing"], out["points"]) == (70, 30, 100)
    assert_same(snapshot(source), snapshot(server_dest))
