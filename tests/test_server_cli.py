"""`idx build / status / query / cluster / remove / alias / snapshot` with --qdrant-url, run
in-process (Typer's CliRunner) so the server backend they open is the injected local-mode client
(conftest.qdrant_local; a subprocess could not share it); a real server too when QDRANT_URL is
set (the API key from QDRANT_API_KEY, as the CLI reads it). Results are checked against what the
store holds, computed with numpy, not only for a zero exit."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import QDRANT_URL, SERVER_KINDS, drop, store_place
from phisearch.indexer.sources.shards import read_shard
from phisearch.indexer.store import StoreConfig, open_store
from phisearch.ui.cli import app, one_line
from typer.testing import CliRunner


def idx(*args: str) -> tuple[int, dict | None, str]:
    """Run `idx ARGS` in this process: (exit code, the --json object or None, stderr)."""
    res = CliRunner().invoke(app, list(args))
    out = json.loads(res.stdout) if "--json" in args and res.exit_code == 0 else None
    err = res.stderr
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        err += f"error: {one_line(str(res.exception))}\n"   # what idx's main() prints for it
    return res.exit_code, out, err


def where(cfg: StoreConfig, collection: str | None = None) -> list[str]:
    return ["--qdrant-url", cfg.url, "--collection", collection or cfg.collection]


@pytest.fixture(params=SERVER_KINDS)
def cli_cfg(request, tmp_path, monkeypatch) -> Iterator[StoreConfig]:
    """The server backend over local mode (and a real server when QDRANT_URL is set)."""
    monkeypatch.setenv("PHISEARCH_NO_PROGRESS", "1")
    cfg = store_place(request, request.param, tmp_path)
    yield cfg
    drop(cfg)


def build_args(cfg: StoreConfig, shard: str, ckpt: str, *extra: str,
               collection: str | None = None) -> list[str]:
    return ["build", "--data", shard, "--checkpoint", ckpt, "--draws", "2", "--workers", "0",
            "--device", "cpu", "--json", *where(cfg, collection), *extra]


def test_cli_build_status_query_through_the_server_backend(cli_cfg, mini_shard, tiny_ckpt,
                                                           tmp_path):
    code, b, err = idx(*build_args(cli_cfg, mini_shard, tiny_ckpt))
    assert code == 0, err
    assert b["indexed"] == 100 and b["skipped"] == {} and b["points"] == 100
    code, again, err = idx(*build_args(cli_cfg, mini_shard, tiny_ckpt))
    assert code == 0 and again["indexed"] == 0 and again["shards_already_done"] == 1, err
    code, s, err = idx("status", "--json", *where(cli_cfg))
    assert code == 0, err
    assert (s["points"], s["shards_done"], s["shards_pending"]) == (100, 1, 0)
    assert (s["sigma"], s["draws"], s["seed"], s["schema_version"]) == (0.2, 2, 0, 1)
    # query by key with a label filter: numpy's ranking of the stored vectors with that label
    raws = [r for r in read_shard(mini_shard) if isinstance(r, dict)]
    with open_store(cli_cfg) as st:
        points = list(st.scroll({"label": 0}, with_vectors=True))
        src, = st.scroll({"key": raws[0]["__key__"]}, with_vectors=True)
    d = np.array([np.linalg.norm(p.vector - src.vector) for p in points])
    want = [points[i].id for i in np.argsort(d)[:5]]
    code, q, err = idx("query", "--key", raws[0]["__key__"], "-k", "5", "--label", "0", "--json",
                       *where(cli_cfg))
    assert code == 0, err
    assert [h["id"] for h in q["hits"]] == want
    np.testing.assert_allclose([h["distance"] for h in q["hits"]], np.sort(d)[:5], atol=1e-4)
    assert all(h["label"] == 0 for h in q["hits"])
    # query by image: the image itself first, at distance ~0, with an explanation
    img = tmp_path / "q.jpg"
    img.write_bytes(raws[1]["jpg"])
    code, q, err = idx("query", str(img), "-k", "3", "--explain", "--json", *where(cli_cfg))
    assert code == 0, err
    assert q["hits"][0]["key"] == raws[1]["__key__"] and q["hits"][0]["distance"] < 1e-3
    assert "drivers" in q["hits"][0]["explain"]
    code, _, err = idx("status", *where(cli_cfg, "nope"))
    assert code == 1 and "no collection" in err and err.count("\n") == 1


def test_cli_cluster_remove_alias_switch_and_snapshot(cli_cfg, mini_shard, tiny_ckpt):
    assert idx(*build_args(cli_cfg, mini_shard, tiny_ckpt))[0] == 0
    code, c, err = idx("cluster", "--method", "kmeans", "--k", "3", "--preprocess", "raw",
                       "--json", *where(cli_cfg))
    assert code == 0, err
    assert c["method"] == "kmeans" and c["clusters"] == 3 and c["noise"] == 0
    with open_store(cli_cfg) as st:
        doc = st.get_doc("clusters")
        sizes = [st.count({"cluster_id": k}) for k in range(3)]
    assert sizes == [x["size"] for x in doc["clusters"]] and sum(sizes) == 100
    code, r, err = idx("remove", "--filter", '{"label": 3}', "--yes", "--json", *where(cli_cfg))
    assert code == 0 and r["deleted"] == 10, err
    with open_store(cli_cfg) as st:
        assert st.count() == 90 and st.count({"label": 3}) == 0
        assert st.get_doc("shards") == {}   # the shard is no longer recorded as done
    # alias switching: `live` -> this collection, then -> one built at σ 0.4 beside it
    other, live = f"{cli_cfg.collection}_b", f"live_{uuid.uuid4().hex[:8]}"
    try:
        assert idx(*build_args(cli_cfg, mini_shard, tiny_ckpt, "--sigma", "0.4",
                               collection=other))[0] == 0
        assert idx("alias", "set", live, cli_cfg.collection, "--qdrant-url", cli_cfg.url)[0] == 0
        code, s, err = idx("status", "--json", *where(cli_cfg, live))
        assert code == 0 and (s["points"], s["sigma"]) == (90, 0.2), err
        assert idx("alias", "set", live, other, "--qdrant-url", cli_cfg.url)[0] == 0
        code, s, err = idx("status", "--json", *where(cli_cfg, live))
        assert code == 0 and (s["points"], s["sigma"]) == (100, 0.4), err
        aliases = {c["name"]: c["aliases"] for c in s["collections"]}
        assert aliases[other] == [live] and aliases[cli_cfg.collection] == []
        code, _, err = idx("alias", "set", other, cli_cfg.collection, "--qdrant-url", cli_cfg.url)
        assert code == 1 and "cannot shadow" in err
        assert idx("alias", "delete", live, "--qdrant-url", cli_cfg.url)[0] == 0
        code, _, err = idx("status", *where(cli_cfg, live))
        assert code == 1 and "no collection" in err
    finally:
        drop(StoreConfig(url=cli_cfg.url, collection=other))
    code, snap, err = idx("snapshot", "create", "--json", *where(cli_cfg))
    if cli_cfg.url == QDRANT_URL:   # a real server takes it (its restore: test_store_server.py)
        assert code == 0 and snap["points"] == 90, err
    else:                           # local mode has no snapshots, and says so in one line
        assert code == 1 and "not supported in the local Qdrant" in err and err.count("\n") == 1
