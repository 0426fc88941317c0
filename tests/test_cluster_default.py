"""Issue 17, Clusters: the default `idx cluster` (HDBSCAN eom in a UMAP projection, sizes scaled to
the collection) labels most points and records its space; a build that writes points after a
clustering marks it stale (store doc, `idx status`, the UI); the UI counts clustered vs noise."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from phisearch.indexer.cli.status import clustering_line
from phisearch.indexer.ingest.pipeline import BuildConfig, build
from phisearch.indexer.ingest.summary import status
from phisearch.indexer.manage.cluster import ClusterConfig, auto_min_size, cluster
from phisearch.indexer.model.config import PhiConfig
from phisearch.indexer.store import StoreConfig, open_store
from PIL import Image
from streamlit.testing.v1 import AppTest
from test_ui_apptest import APP, use_store


@pytest.fixture
def store(mini_store: Path, tmp_path: Path) -> StoreConfig:
    """A writable copy of the mini store (100 points, 10 labels)."""
    shutil.copytree(mini_store, tmp_path / "store")
    return StoreConfig(path=str(tmp_path / "store"), collection="phisearch")


def cluster_ids(cfg: StoreConfig) -> dict[str, int | None]:
    with open_store(cfg) as st:
        return {h.id: h.payload.get("cluster_id") for h in st.scroll()}


def test_auto_min_cluster_size_scales_with_the_collection():
    # 50 at the measured 13,394 points (bench/results/cluster_default.json), 5 at the floor
    assert auto_min_size(13394) == 50 and auto_min_size(250_000) == 50
    assert auto_min_size(5000) == 20 and auto_min_size(100) == 5 and auto_min_size(2) == 5
    cfg = ClusterConfig()
    assert (cfg.method, cfg.selection, cfg.min_samples, cfg.projection, cfg.proj_dims,
            cfg.neighbors) == ("hdbscan", "eom", 1, "auto", 10, 30)
    with pytest.raises(ValueError, match="unknown projection"):
        ClusterConfig(projection="tsne")


def test_default_projects_with_umap_labels_most_points_and_records_it(store):
    out = cluster(store, ClusterConfig())
    assert out["projection"] == "umap10" and out["preprocess"] == "pca16"
    assert out["params"]["min_cluster_size"] == 5 and out["params"]["min_samples"] == 1
    assert out["noise"] <= 50 and out["clusters"] >= 2      # most of the 100 points clustered
    ids = cluster_ids(store)
    assert sum(c == -1 for c in ids.values()) == out["noise"]
    assert sum(c >= 0 for c in ids.values()) == sum(out["sizes"]) == 100 - out["noise"]
    with open_store(store) as st:
        doc = st.get_doc("clusters")
    assert doc["projection"] == "umap10" and "stale" not in doc
    # k-means keeps the full space by default; an explicit projection is honoured and recorded
    assert cluster(store, ClusterConfig(method="kmeans", k=4))["projection"] == "none"
    km = cluster(store, ClusterConfig(method="kmeans", k=4, projection="umap", proj_dims=3))
    assert km["projection"] == "umap3" and km["noise"] == 0 and km["clusters"] == 4


def add_folder(tmp_path: Path, n: int = 3) -> Path:
    """n new images in a folder: a build of it writes n points without cluster_id."""
    folder = tmp_path / "new-images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(folder / f"x{i}.png")
    return folder


def rebuild(cfg: StoreConfig, mini_shard: str, tiny_ckpt: str, *extra: str) -> dict:
    """The mini store's own build settings, with extra data beside the mini shard."""
    return build(BuildConfig(data=(mini_shard, *extra), store=cfg, checkpoint=tiny_ckpt,
                             phi=PhiConfig(sigma=0.2, draws=2, seed=0), batch_size=50,
                             workers=0, device="cpu"))


def test_a_build_after_clustering_marks_it_stale(store, tmp_path, mini_shard, tiny_ckpt,
                                                 caplog):
    cluster(store, ClusterConfig(method="kmeans", k=3))
    same = rebuild(store, mini_shard, tiny_ckpt)       # nothing new: nothing written
    assert same["indexed"] == 0 and same["clustering"]["stale"] is False
    with caplog.at_level(logging.WARNING):
        out = rebuild(store, mini_shard, tiny_ckpt, str(add_folder(tmp_path)))
    assert out["indexed"] == 3 and out["clustering"]["stale"] is True
    assert "clustering is stale" in caplog.text and "rerun `idx cluster`" in caplog.text
    assert sum(c is None for c in cluster_ids(store).values()) == 3
    st = status(store)["clustering"]
    assert st["stale"] and st["unclustered"] == 3 and st["changed_points"] == 3
    assert st["clusters"] == 3 and st["noise"] == 0 and st["points"] == 100
    assert "STALE: 3 points written or removed since (3 without a cluster)" in clustering_line(st)
    # idx cluster again: every point labelled, the mark gone
    cluster(store, ClusterConfig(method="kmeans", k=3))
    fresh = status(store)["clustering"]
    assert not fresh["stale"] and fresh["points"] == 103
    assert None not in cluster_ids(store).values()
    assert "STALE" not in clustering_line(fresh) and "103 points clustered" in clustering_line(fresh)


def test_ui_counts_clustered_and_noise_and_shows_stale(monkeypatch, store, tmp_path, mini_shard,
                                                       tiny_ckpt):
    # HDBSCAN in the full space with these sizes leaves noise on the mini store: both counts show
    out = cluster(store, ClusterConfig(projection="none", selection="leaf", min_cluster_size=5,
                                       min_samples=1))
    noise = out["noise"]
    assert 0 < noise < 100
    use_store(monkeypatch, store, hold_s="0")
    at = AppTest.from_file(APP, default_timeout=180).run()
    at = at.switch_page("views/clusters.py").run()
    assert not at.exception, [e.value for e in at.exception]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Clusters"] == str(out["clusters"])
    assert metrics["Noise points"] == str(noise)
    assert metrics["Clustered points"] == str(100 - noise)     # not the collection's 100
    assert any(f"{100 - noise} ({100 - noise}%) in {out['clusters']} clusters, {noise} ({noise}%)"
               " noise" in c.value for c in at.caption)
    last = out["clusters"] - 1
    at.button(key=f"open_{last}").click().run()               # "Open" picks that cluster
    assert at.selectbox(key="cluster_open").value == last
    shown = [c.value for c in at.caption if " · p = " in c.value]
    assert len(shown) == out["sizes"][last]
    assert not at.number_input                                 # no page numbers
    # a build that writes points: both pages say the clustering is stale
    rebuild(store, mini_shard, tiny_ckpt, str(add_folder(tmp_path, 2)))
    at.run()
    assert any("clustering is stale" in w.value and "2 now have no cluster" in w.value
               for w in at.warning)
    at = at.switch_page("views/index.py").run()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Clusters"] == str(out["clusters"]) and metrics["Noise points"] == str(noise)
    assert any("Clustering stale" in w.value for w in at.warning)
