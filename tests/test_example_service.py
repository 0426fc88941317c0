"""examples/query_from_service.py: qdrant-client alone against a collection phisearch built on a
real Qdrant server (QDRANT_URL); skipped without one. The no-phisearch rule is checked always."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
from conftest import REPO

EXAMPLE = REPO / "examples" / "query_from_service.py"
URL = os.environ.get("QDRANT_URL")


def test_example_imports_only_qdrant_client_and_the_stdlib():
    tree = ast.parse(EXAMPLE.read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
            for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree)
             if isinstance(n, ast.ImportFrom) and n.module}
    assert "phisearch" not in mods and "qdrant_client" in mods
    assert mods <= {"__future__", "argparse", "json", "os", "sys", "uuid", "qdrant_client"}
    r = subprocess.run([sys.executable, str(EXAMPLE), "--help"], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0 and "QDRANT_URL" in r.stdout


@pytest.fixture(scope="module")
def server_collection(tmp_path_factory, mini_shard, tiny_ckpt):
    """The mini shard built into a fresh server collection by the phisearch pipeline, clustered."""
    if not URL:
        pytest.skip("QDRANT_URL not set: no Qdrant server on this machine")
    from phisearch.indexer.build.pipeline import BuildConfig, build
    from phisearch.indexer.manage.cluster import ClusterConfig, cluster
    from phisearch.indexer.model.config import PhiConfig
    from phisearch.indexer.store import StoreConfig, open_store

    path = tiny_ckpt
    cfg = StoreConfig(url=URL, api_key=os.environ.get("QDRANT_API_KEY"),
                      collection=f"example_{uuid.uuid4().hex[:8]}")
    build(BuildConfig(data=(mini_shard,), store=cfg, checkpoint=str(path),
                      phi=PhiConfig(sigma=0.2, draws=1, seed=0), batch_size=50, workers=0,
                      device="cpu"))
    cluster(cfg, ClusterConfig(method="kmeans", k=3, preprocess="raw"))
    yield cfg
    with open_store(cfg) as st:
        st.drop()


@pytest.mark.server
def test_example_against_a_server(server_collection):
    from phisearch.indexer.store import open_store

    cfg = server_collection
    with open_store(cfg) as st:
        src = next(iter(st.scroll({"label": 3}, with_vectors=True)))
        dense = np.stack([h.vector for h in st.scroll(with_vectors=True)])
        ids = [h.id for h in st.scroll()]
        meta = st.meta()
    r = subprocess.run([sys.executable, str(EXAMPLE), "--collection", cfg.collection,
                        "--id", src.id, "-k", "5", "--json"],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, QDRANT_URL=URL), check=False)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["meta"]["model_sha256"] == meta["model_sha256"]
    assert out["meta"]["dim"] == meta["dim"] and out["meta"]["schema_version"] == 1
    # 1. kNN by id: the numpy Euclidean ranking of the stored vectors (the point itself may be
    #    excluded by Qdrant's query-by-id)
    d = np.linalg.norm(dense - src.vector, axis=1)
    expect = [ids[i] for i in np.argsort(d) if ids[i] != src.id][:4]
    got = [h["id"] for h in out["knn"] if h["id"] != src.id][:4]
    assert got == expect
    np.testing.assert_allclose([h["score"] for h in out["knn"] if h["id"] != src.id][:4],
                               np.sort(d[[ids.index(i) for i in expect]]), rtol=1e-4, atol=1e-5)
    # 2. channel query: every hit fires on at least one of the channels, scores descending
    assert 1 <= len(out["channels"]) <= 3 and out["by_channel"]
    scores = [h["score"] for h in out["by_channel"]]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    # 3. filter: only the query point's label and cluster
    assert out["filter"] == {"label": 3, "cluster_id": src.payload["cluster_id"]}
    assert out["filtered"] and all(h["label"] == 3 and h["cluster_id"] ==
                                   src.payload["cluster_id"] for h in out["filtered"])
