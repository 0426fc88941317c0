"""idx cluster on a real Edge store built from the mini shard with a tiny (untrained) model, and
on the same collection through the server backend (local mode; a real server with QDRANT_URL)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import STORE_KINDS, drop, store_place
from phisearch.indexer.manage.cluster import (
    ClusterConfig,
    Preprocessor,
    cluster,
    fit_assign,
    resolve_preprocess,
)
from phisearch.indexer.manage.export import ExportConfig, export
from phisearch.indexer.store import StoreConfig, StoreError, open_store
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def built_store(mini_store) -> Path:
    """One build of the 100 mini images (conftest.mini_store); each test clusters its own
    copy."""
    return mini_store


@pytest.fixture(params=STORE_KINDS)
def store_cfg(request, built_store, tmp_path) -> Iterator[StoreConfig]:
    """Edge: a copy of the module's store. Server (local mode; QDRANT_URL's too when set): the
    same collection exported into a fresh server collection, dropped afterwards."""
    if request.param == "edge":
        shutil.copytree(built_store, tmp_path / "store")
        yield StoreConfig(path=str(tmp_path / "store"), collection="phisearch")
        return
    cfg = store_place(request, request.param, tmp_path)
    source = StoreConfig(path=str(built_store), collection="phisearch")
    assert export(ExportConfig(source=source, dest=cfg))["points"] == 100
    yield cfg
    drop(cfg)


def store_args(cfg: StoreConfig) -> list[str]:
    """The CLI flags naming cfg's store (the API key comes from QDRANT_API_KEY)."""
    return ["--qdrant-url", cfg.url, "--collection", cfg.collection] if cfg.url else \
        ["--store", cfg.path]


def labels_of(cfg: StoreConfig) -> dict[str, tuple[int, float]]:
    with open_store(cfg) as st:
        return {h.id: (h.payload.get("cluster_id"), h.payload.get("cluster_prob"))
                for h in st.scroll()}


def check_consistent(cfg: StoreConfig, points: int = 100) -> dict:
    """Every point has one int cluster_id; the doc's sizes match the filters and the noise."""
    got = labels_of(cfg)
    assert len(got) == points
    assert all(isinstance(c, int) and 0.0 <= p <= 1.0 for c, p in got.values())
    with open_store(cfg) as st:
        doc = st.get_doc("clusters")
        assert st.count() == points
        assert sum(c["size"] for c in doc["clusters"]) == points - doc["noise"]
        for c in doc["clusters"]:
            assert st.count({"cluster_id": c["id"]}) == c["size"]
            assert len(c["centroid_mid"]) == 16 and len(c["channels"]) == 8
            assert 1 <= len(c["exemplars"]) <= 5 and len(c["exemplar_ids"]) == len(c["exemplars"])
            assert all(got[i][0] == c["id"] for i in c["exemplar_ids"])
        assert st.count({"cluster_id": -1}) == doc["noise"]
    return doc


def test_hdbscan_labels_every_point_and_rerun_replaces(store_cfg):
    cfg = ClusterConfig(method="hdbscan", min_cluster_size=5)
    first = cluster(store_cfg, cfg)
    assert {"method", "clusters", "noise", "seconds"} <= set(first)
    assert first["method"] == "hdbscan" and first["clusters"] >= 1
    doc = check_consistent(store_cfg)
    assert doc["noise"] == first["noise"] and len(doc["clusters"]) == first["clusters"]
    assert doc["preprocess"] == "pca16"   # auto: the mid readout is not whitened; 16 channels
    assert doc["clusters"][0]["size"] == max(c["size"] for c in doc["clusters"])  # 0 = largest
    # re-run with another method: replaced, not added (same count, one id per point)
    again = cluster(store_cfg, ClusterConfig(method="kmeans", k=3, preprocess="raw"))
    assert again["clusters"] == 3 and again["noise"] == 0
    doc = check_consistent(store_cfg)
    assert doc["method"] == "kmeans" and doc["preprocess"] == "raw"
    assert {c for c, _ in labels_of(store_cfg).values()} == {0, 1, 2}


def test_cli_kmeans_k5_and_filter(store_cfg, monkeypatch):
    from phisearch.ui.cli import app

    monkeypatch.setenv("PHISEARCH_NO_PROGRESS", "1")
    res = CliRunner().invoke(app, ["cluster", "--method", "kmeans", "--k", "5", "--preprocess",
                                   "l2", "--json", *store_args(store_cfg)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["method"] == "kmeans" and 1 <= out["clusters"] <= 5 and out["noise"] == 0
    doc = check_consistent(store_cfg)
    with open_store(store_cfg) as st:
        c = doc["clusters"][0]
        hits = list(st.scroll({"cluster_id": c["id"]}))
        assert len(hits) == c["size"] and all(h.payload["cluster_id"] == c["id"] for h in hits)
    res = CliRunner().invoke(app, ["cluster", "--method", "spectral", *store_args(store_cfg)])
    assert res.exit_code == 2


@pytest.mark.parametrize("method", ["hdbscan", "kmeans"])
def test_sample_then_assign_labels_every_point(store_cfg, method):
    cfg = ClusterConfig(method=method, min_cluster_size=3, k=4, sample_above=40)
    stages: list[str] = []
    out = cluster(store_cfg, cfg, lambda stage, done, total: stages.append(stage))
    assert out["fit_points"] == 40 and out["assigned_points"] == 60
    assert out["clusters"] >= 2 and out["noise"] < 100
    assert "assign" in stages and "write" in stages
    check_consistent(store_cfg)


def test_preprocess_and_errors(tmp_path):
    x = np.abs(np.random.default_rng(0).normal(size=(50, 12))).astype(np.float32)
    z = Preprocessor.fit(x, "pca", 4)(x)
    assert z.shape == (50, 4) and abs(z.mean()) < 1e-4
    assert np.allclose(np.linalg.norm(Preprocessor.fit(x, "l2", 4)(x), axis=1), 1.0)
    assert resolve_preprocess("auto", "blocks+white64") == "l2"
    assert resolve_preprocess("auto", "mid") == "pca" and resolve_preprocess("raw", "x") == "raw"
    labels, strength, _ = fit_assign(x, ClusterConfig(method="kmeans", k=60))  # k clamped
    assert len(set(labels)) <= 50 and strength.min() >= 0
    with pytest.raises(ValueError, match="unknown method"):
        ClusterConfig(method="dbscan")
    with pytest.raises(StoreError, match="no collection"):
        cluster(StoreConfig(path=str(tmp_path / "none")), ClusterConfig())
