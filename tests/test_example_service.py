"""examples/query_from_service.py: qdrant-client alone against a collection phisearch built
through the server backend: qdrant-client's local mode here, a real Qdrant server too when
QDRANT_URL is set. The no-phisearch rule is checked always."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
import uuid
from collections import Counter

import numpy as np
import pytest
from conftest import LOCAL_URL, REPO, SERVER_KINDS, drop, store_place

EXAMPLE = REPO / "examples" / "query_from_service.py"


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


@pytest.fixture(scope="module", params=SERVER_KINDS)
def server_collection(request, tmp_path_factory, mini_shard, tiny_ckpt):
    """The mini shard built into a fresh server collection by the phisearch pipeline, clustered:
    through local mode (in this process) here, on QDRANT_URL's server too when set."""
    from phisearch.indexer.ingest.pipeline import BuildConfig, build
    from phisearch.indexer.manage.cluster import ClusterConfig, cluster
    from phisearch.indexer.model.config import PhiConfig

    cfg = store_place(request, request.param, tmp_path_factory.mktemp("example"),
                      collection=f"example_{uuid.uuid4().hex[:8]}")
    build(BuildConfig(data=(mini_shard,), store=cfg, checkpoint=tiny_ckpt,
                      phi=PhiConfig(sigma=0.2, draws=1, seed=0), batch_size=50, workers=0,
                      device="cpu"))
    cluster(cfg, ClusterConfig(method="kmeans", k=3, preprocess="raw"))
    yield cfg
    drop(cfg)


def run_example(cfg, request, *args: str) -> dict:
    """The example's three queries as one JSON object. On a real server: the script itself, in a
    subprocess. On local mode: its run() in this process with the injected client (the same
    queries; only argument parsing and the client's construction are skipped)."""
    if cfg.url == LOCAL_URL:
        spec = importlib.util.spec_from_file_location("query_from_service", EXAMPLE)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        opts = dict(zip(args[::2], args[1::2]))
        return json.loads(json.dumps(mod.run(
            request.getfixturevalue("qdrant_local"), cfg.collection, opts.get("--id"),
            int(opts.get("-k", 5)), None, None, 3)))
    r = subprocess.run([sys.executable, str(EXAMPLE), "--collection", cfg.collection, *args,
                        "--json"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, QDRANT_URL=cfg.url), check=False)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_example_against_a_server(server_collection, request):
    from phisearch.indexer.store import open_store

    cfg = server_collection
    with open_store(cfg) as st:
        points = list(st.scroll(with_vectors=True))
        meta = st.meta()
    # the query point: a label-3 image in the biggest (label 3, cluster) group, so 3. has hits
    group = Counter(h.payload["cluster_id"] for h in points if h.payload["label"] == 3)
    src = next(h for h in points if h.payload["label"] == 3 and
               h.payload["cluster_id"] == group.most_common(1)[0][0])
    assert group.most_common(1)[0][1] >= 3
    dense = np.stack([h.vector for h in points])
    ids = [h.id for h in points]
    out = run_example(cfg, request, "--id", src.id, "-k", "5")
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
    # 2. channel query: the point's 3 strongest channels; each score is the sum of a point's
    #    activations on them (numpy over the stored sparse vectors), descending
    top = sorted(int(i) for _, i in sorted(zip(src.sparse[1], src.sparse[0]), reverse=True)[:3])
    assert out["channels"] == top
    sums = {h.id: sum(dict(zip(*h.sparse)).get(c, 0.0) for c in top) for h in points}
    scores = [h["score"] for h in out["by_channel"]]
    np.testing.assert_allclose(scores, sorted(sums.values(), reverse=True)[:5], atol=1e-5)
    assert all(sums[h["id"]] == pytest.approx(h["score"], abs=1e-5) for h in out["by_channel"])
    # 3. filter: the kNN of 1. among the points with the query point's label and cluster only
    assert out["filter"] == {"label": 3, "cluster_id": src.payload["cluster_id"]}
    same = [i for i, h in enumerate(points) if h.payload["label"] == 3 and
            h.payload["cluster_id"] == src.payload["cluster_id"] and h.id != src.id]
    expect = [ids[i] for i in sorted(same, key=lambda i: d[i])][:4]
    got = [h["id"] for h in out["filtered"] if h["id"] != src.id][:4]
    assert expect and got == expect
    assert all(h["label"] == 3 and h["cluster_id"] == src.payload["cluster_id"]
               for h in out["filtered"])
