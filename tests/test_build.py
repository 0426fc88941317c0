"""idx build / status / query end to end on a real Edge store and through the server backend
(qdrant-client's local mode here; a real server too when QDRANT_URL is set)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import STORE_KINDS, drop, run_idx, store_place
from fixtures import Gate
from phisearch.indexer.ingest.pipeline import BuildConfig, build
from phisearch.indexer.ingest.summary import status
from phisearch.indexer.model import checkpoint as ckpt
from phisearch.indexer.model.config import PhiConfig
from phisearch.indexer.model.embedder import Embedder
from phisearch.indexer.sources.shards import read_shard
from phisearch.indexer.store import MetaMismatch, StoreConfig, open_store, point_id

IDX = [sys.executable, "-m", "phisearch.ui"]

@pytest.fixture(params=STORE_KINDS)
def store_cfg(request, tmp_path):
    """Edge, the server backend over qdrant-client's local mode, and a real server when
    QDRANT_URL is set (conftest.STORE_KINDS)."""
    cfg = store_place(request, request.param, tmp_path)
    yield cfg
    drop(cfg)


def split_shard(src: str, folder: Path, parts: int) -> list[str]:
    """Re-shard the mini shard into `parts` shards in `folder` (same keys, same bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    raws = [r for r in read_shard(src) if isinstance(r, dict)]
    urls = []
    per = -(-len(raws) // parts)
    for i in range(parts):
        url = str(folder / f"part-{i:06d}.tar")
        with wds.TarWriter(url) as w:
            for r in raws[i * per:(i + 1) * per]:
                w.write({k: v for k, v in r.items() if k == "__key__" or not k.startswith("__")})
        urls.append(url)
    return urls


def run_build(cfg: StoreConfig, data: list[str], ckpt_path: str, **kw) -> dict:
    return build(BuildConfig(data=tuple(data), store=cfg, checkpoint=ckpt_path,
                             phi=kw.pop("phi", PhiConfig(sigma=0.2, draws=2, seed=0)),
                             batch_size=kw.pop("batch_size", 32), workers=kw.pop("workers", 0),
                             device="cpu", **kw))


def test_build_mini_then_query_and_rebuild(store_cfg, mini_shard, tiny_ckpt):
    summary = run_build(store_cfg, [mini_shard], tiny_ckpt)
    assert summary["indexed"] == 100 and summary["points"] == 100 and summary["skipped"] == {}
    with open_store(store_cfg) as st:
        assert st.count() == 100
        assert st.count({"label": 3}) == 10
        # an image's own φ finds itself at distance 0; the sparse vector = the non-zero channels
        raws = [r for r in read_shard(mini_shard) if isinstance(r, dict)][:3]
        from phisearch.indexer.sources import images

        emb = Embedder.from_meta(st.meta(), "cpu")
        assert emb.meta()["model_sha256"] == st.meta()["model_sha256"]
        for raw in raws:
            dense, mid = emb(images.decode(raw["jpg"])[None])
            hits = st.search(dense[0], limit=3)
            assert hits[0].payload["key"] == raw["__key__"]
            assert hits[0].distance < 1e-3
            stored = st.retrieve([hits[0].id], with_vectors=True)[0]
            idx, vals = stored.sparse
            assert sorted(idx) == np.flatnonzero(mid[0] > 0).tolist()
            np.testing.assert_allclose(np.asarray(vals)[np.argsort(idx)],
                                       mid[0][mid[0] > 0], rtol=1e-5)
            p = stored.payload
            assert p["active_channels"] == len(idx)
            # phi_norm is the paper's φ's norm (what phi_sparse holds), not the readout's
            assert p["phi_norm"] == pytest.approx(float(np.linalg.norm(vals)), rel=1e-5)
            assert p["dataset"] == "imagenette-64" and p["split"] == "mini"
            assert p["label_name"] and isinstance(p["label"], int) and p["thumb"]
            assert stored.id == point_id("imagenette-64", raw["__key__"])
    again = run_build(store_cfg, [mini_shard], tiny_ckpt)
    assert again["indexed"] == 0 and again["shards_already_done"] == 1
    assert again["points"] == 100
    st = status(store_cfg)
    assert st["points"] == 100 and st["shards_done"] == 1 and st["shards_pending"] == 0
    assert st["sigma"] == 0.2 and st["draws"] == 2
    # the no-op rebuild kept the summary of the build that indexed, and says when it checked
    assert st["last_run"]["indexed"] == 100 and st["last_run"]["pending"] == []
    assert st["last_run"]["checked_at"] >= st["last_run"]["finished_at"]
    assert "running_since" not in st["last_run"]


def test_mismatched_settings_are_refused(store_cfg, mini_shard, tiny_ckpt, tmp_path):
    run_build(store_cfg, [mini_shard], tiny_ckpt)
    with pytest.raises(MetaMismatch, match="sigma"):
        run_build(store_cfg, [mini_shard], tiny_ckpt, phi=PhiConfig(sigma=0.4, draws=2))
    other = tmp_path / "other.safetensors"
    ckpt.save(ckpt.untrained("tiny", seed=2).model, other, preset_name="tiny")
    with pytest.raises(MetaMismatch, match="model_sha256"):
        run_build(store_cfg, [mini_shard], str(other))
    with open_store(store_cfg) as st:
        assert st.count() == 100


def test_bad_inputs_are_counted_and_good_ones_indexed(store_cfg, mini_shard, tiny_ckpt, tmp_path):
    from fixtures import write_bad_shard, write_truncated_tar

    bad = tmp_path / "bad" / "bad-000000.tar"
    bad.parent.mkdir()
    expected = write_bad_shard(bad, mini_shard)
    trunc = tmp_path / "bad" / "trunc-000000.tar"
    n_trunc = write_truncated_tar(trunc, mini_shard, 10)
    summary = run_build(store_cfg, [str(bad), str(trunc)], tiny_ckpt, dataset="badset")
    good = expected.pop("good")
    # both fixture shards copy the first 6 mini images, so they share keys: the second shard's
    # copies are duplicate keys of the first (its points kept), one point per key
    shared = 6
    assert summary["indexed"] >= good + n_trunc - 1 - shared
    for reason, n in expected.items():
        assert summary["skipped"].get(reason) == n, (reason, summary["skipped"])
    assert summary["skipped"].get("truncated_tar") == 1
    assert summary["skipped"].get("duplicate_key") == shared
    listed = {(s["reason"]) for s in summary["skipped_samples"]}
    assert set(expected) <= listed
    with open_store(store_cfg) as st:
        keys = [h.payload["key"] for h in st.scroll()]
    assert summary["points"] == len(keys) == len(set(keys)) == summary["indexed"]


@pytest.mark.parametrize("store_cfg", ["edge"], indirect=True)
def test_sigkill_midway_then_resume(store_cfg, mini_shard, tiny_ckpt, tmp_path):
    """SIGKILL once two of ten shards are recorded, while the fourth waits at its first byte
    (a Gate: the build cannot finish before the kill); the rerun completes it exactly."""
    urls = split_shard(mini_shard, tmp_path / "parts", 10)
    records = Path(store_cfg.path) / store_cfg.collection / "docs" / "shards.json"
    env = dict(os.environ, PHISEARCH_NO_PROGRESS="1")
    with Gate(tmp_path / "gate") as gate:
        data = [*urls[:3], gate.url(urls[3]), *urls[4:]]
        cmd = IDX + ["build", "--store", store_cfg.path, "--checkpoint", tiny_ckpt, "--draws",
                     "20", "--batch-size", "2", "--workers", "0", "--device", "cpu"]
        cmd += [x for url in data for x in ("--data", url)]
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
        done_at_kill = 0
        if gate.wait(proc):
            deadline = time.monotonic() + 120   # shards 0 and 1 recorded: a failure bound
            while done_at_kill < 2 and time.monotonic() < deadline:
                try:
                    done_at_kill = len(json.loads(records.read_text()))
                except (OSError, ValueError):
                    pass
                time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert 2 <= done_at_kill < 10
    out = run_idx(*cmd[len(IDX):], "--json")   # the resume: in this process
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert summary["shards_already_done"] >= done_at_kill
    assert summary["points"] == 100
    with open_store(store_cfg) as st:
        keys = [h.payload["key"] for h in st.scroll()]
    assert len(keys) == len(set(keys)) == 100


@pytest.mark.parametrize("store_cfg", ["edge"], indirect=True)
def test_cli_build_status_query_json(store_cfg, mini_shard, tiny_ckpt, tmp_path):
    """In this process (conftest.run_idx); test_cli_core runs the console script itself."""
    base = ["--store", store_cfg.path]
    r = run_idx("build", "--data", mini_shard, "--checkpoint", tiny_ckpt, "--draws", "2",
                "--json", *base)
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout)
    assert {"indexed", "skipped", "seconds", "img_per_s", "stages"} <= set(b)
    r = run_idx("status", "--json", *base)
    s = json.loads(r.stdout)
    for key in ("points", "shards_done", "shards_pending", "skipped", "model_sha256", "sigma",
                "draws", "seed", "schema_version"):
        assert key in s
    assert s["points"] == 100 and isinstance(s["shards_done"], int)
    key = next(x["__key__"] for x in read_shard(mini_shard) if isinstance(x, dict))
    r = run_idx("query", "--key", key, "-k", "5", "--label", "0", "--json", *base)
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)["hits"]
    assert len(hits) == 5 and all(h["label"] == 0 for h in hits)
    assert set(hits[0]) >= {"id", "key", "label", "label_name", "distance", "cluster_id"}
    img = tmp_path / "q.jpg"
    raw = next(x for x in read_shard(mini_shard) if isinstance(x, dict))
    img.write_bytes(raw["jpg"])
    r = run_idx("query", str(img), "-k", "3", "--json", "--explain", *base)
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)["hits"]
    assert hits[0]["key"] == raw["__key__"] and hits[0]["distance"] < 1e-3
    assert "drivers" in hits[0]["explain"]
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    r = run_idx("query", str(bad), *base)
    assert r.returncode == 1 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    r = run_idx("status", "--store", str(tmp_path / "empty"))
    assert r.returncode == 1 and "no collection" in r.stderr


@pytest.mark.parametrize("store_cfg", ["edge"], indirect=True)
def test_a_changed_shard_deletes_the_points_it_no_longer_holds(store_cfg, mini_shard, tiny_ckpt,
                                                               tmp_path):
    raws = [r for r in read_shard(mini_shard) if isinstance(r, dict)][:10]
    shard = tmp_path / "s.tar"

    def write(rows: list[dict]) -> None:
        with wds.TarWriter(str(shard)) as w:
            for r in rows:
                w.write({k: v for k, v in r.items() if k == "__key__" or not k.startswith("__")})

    (tmp_path / "manifest.json").write_text(json.dumps({"name": "imagenette-64"}))
    write(raws)
    assert run_build(store_cfg, [str(shard)], tiny_ckpt)["points"] == 10
    write(raws[:7])                          # the shard changes (its size): three are gone
    out = run_build(store_cfg, [str(shard)], tiny_ckpt)
    assert out["shards_changed"] == 1 and out["points"] == 7
    with open_store(store_cfg) as st:
        assert sorted(h.payload["key"] for h in st.scroll()) == sorted(r["__key__"]
                                                                       for r in raws[:7])
        rec = st.get_doc("shards")[os.path.realpath(shard)]
    assert rec["deleted"] == 3 and rec["indexed"] == 7


@pytest.mark.parametrize("store_cfg", ["edge"], indirect=True)
def test_build_at_another_sigma_refuses_the_default_whitening(store_cfg, mini_shard):
    r = run_idx("build", "--data", mini_shard, "--store", store_cfg.path, "--sigma", "0")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "fitted on φ at σ 0.2" in r.stderr and "idx fit-readout" in r.stderr
    assert not os.path.exists(os.path.join(store_cfg.path, "phisearch", "shard"))
