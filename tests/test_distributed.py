"""Distributed idx build: torchrun with 2 CPU ranks (gloo) gives the same index as one process,
resumes like one, and stops every rank with one message when rank 0 refuses the store."""

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
from fixtures import Gate, sample_offset
from phisearch.indexer.ingest.distributed import build_distributed
from phisearch.indexer.ingest.pipeline import BuildConfig, build
from phisearch.indexer.model.config import PhiConfig
from phisearch.indexer.sources.shards import read_shard
from phisearch.indexer.store import SHARDS_DOC, StoreConfig, StoreError, open_store

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
SIZES = (50, 30, 20)   # uneven, so rank 1 (30 images) runs out of batches before rank 0 (70)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, mini_shard, tiny_ckpt) -> dict:
    """Three real shards cut from the mini shard, and a tiny untrained checkpoint."""
    root = tmp_path_factory.mktemp("dist")
    raws = [r for r in read_shard(mini_shard) if isinstance(r, dict)]
    (root / "shards").mkdir()
    start = 0
    for i, n in enumerate(SIZES):
        with wds.TarWriter(str(root / "shards" / f"part-{i:06d}.tar")) as w:
            for r in raws[start:start + n]:
                w.write({k: v for k, v in r.items() if k == "__key__" or not k.startswith("__")})
        start += n
    path = tiny_ckpt
    return {"root": root, "ckpt": str(path),
            "data": str(root / "shards" / "part-{000000..000002}.tar")}


def torchrun(nproc: int, args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PHISEARCH_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    return subprocess.run(TORCHRUN + [str(nproc), "-m", "phisearch.ui", "build"] + args,
                          env=env, capture_output=True, text=True, timeout=timeout)


def snapshot(cfg: StoreConfig) -> tuple[dict, dict]:
    with open_store(cfg) as st:
        points = {h.id: h for h in st.scroll(with_vectors=True)}
        return points, st.get_doc(SHARDS_DOC)


@pytest.mark.slow   # PHISEARCH_SLOW=1 and CI run it
def test_two_ranks_build_the_same_index_as_one_process(setup, tmp_path):
    args = ["--data", setup["data"], "--checkpoint", setup["ckpt"], "--draws", "2",
            "--batch-size", "16", "--workers", "0", "--device", "cpu", "--json"]
    one = StoreConfig(path=str(tmp_path / "one"))
    single = build(BuildConfig(data=(setup["data"],), store=one, checkpoint=setup["ckpt"],
                               phi=PhiConfig(sigma=0.2, draws=2, seed=0), batch_size=16,
                               workers=0, device="cpu"))
    two = StoreConfig(path=str(tmp_path / "two"))
    r = torchrun(2, args + ["--store", two.path])
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)   # only rank 0 prints: exactly one JSON object
    assert set(single) <= set(summary)
    assert summary["world_size"] == 2 and summary["indexed"] == summary["points"] == 100
    assert [x["indexed"] for x in summary["ranks"]] == [SIZES[0] + SIZES[2], SIZES[1]]
    assert summary["shards_indexed"] == 3 and summary["skipped"] == {}

    p1, shards1 = snapshot(one)
    p2, shards2 = snapshot(two)
    assert set(p1) == set(p2) and len(p2) == 100
    for pid, a in p1.items():
        b = p2[pid]
        np.testing.assert_allclose(b.vector, a.vector, atol=1e-5, rtol=0)
        assert a.sparse[0] == b.sparse[0]
        np.testing.assert_allclose(b.sparse[1], a.sparse[1], atol=1e-5, rtol=0)
        assert {k: v for k, v in a.payload.items() if k != "phi_norm"} == \
            {k: v for k, v in b.payload.items() if k != "phi_norm"}
        assert abs(a.payload["phi_norm"] - b.payload["phi_norm"]) < 1e-4
    def strip(doc: dict) -> dict:   # completion times differ between the two builds
        return {u: {k: v for k, v in rec.items() if k != "completed_at"} for u, rec in doc.items()}

    assert strip(shards1) == strip(shards2) and len(shards2) == 3
    assert [shards2[u]["indexed"] for u in sorted(shards2)] == list(SIZES)

    # resume: nothing left to do; a new shard is the only one indexed
    r = torchrun(2, args + ["--store", two.path])
    again = json.loads(r.stdout)
    assert again["indexed"] == 0 and again["shards_already_done"] == 3 and again["points"] == 100
    extra = setup["root"] / "shards" / "part-000003.tar"
    with wds.TarWriter(str(extra)) as w:
        raws = [x for x in read_shard(str(setup["root"] / "shards" / "part-000002.tar"))
                if isinstance(x, dict)][:5]
        for x in raws:
            w.write({"__key__": "copy_" + x["__key__"], "jpg": x["jpg"], "cls": x["cls"]})
    r = torchrun(2, args[:1] + [str(setup["root"] / "shards" / "part-{000000..000003}.tar")]
                 + args[2:] + ["--store", two.path])
    assert r.returncode == 0, r.stderr[-3000:]
    more = json.loads(r.stdout)
    assert more["indexed"] == 5 and more["shards_already_done"] == 3 and more["points"] == 105


def test_a_refused_store_stops_every_rank_with_one_message(setup, tmp_path):
    store = StoreConfig(path=str(tmp_path / "s"))
    build(BuildConfig(data=(setup["data"],), store=store, checkpoint=setup["ckpt"],
                      phi=PhiConfig(sigma=0.2, draws=2, seed=0), workers=0, device="cpu"))
    r = torchrun(2, ["--data", setup["data"], "--checkpoint", setup["ckpt"], "--draws", "3",
                     "--workers", "0", "--device", "cpu", "--store", store.path])
    assert r.returncode != 0
    assert "MetaMismatch" in r.stderr and "draws stored 2" in r.stderr
    # each rank says it in one line (rank 1 did not hang); the traceback after them is
    # torchrun's own report of a failed child, none comes from phisearch
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and any("rank 0 could not open the store" in e for e in errors)
    assert "/indexer/" not in r.stderr


def test_distributed_flag_without_a_launcher_is_a_one_line_error(setup, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    r = subprocess.run([sys.executable, "-m", "phisearch.ui", "build", "--distributed",
                        "--data", setup["data"], "--checkpoint", setup["ckpt"],
                        "--store", str(tmp_path / "s")],
                       env=dict(env, PHISEARCH_NO_PROGRESS="1", OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "torchrun" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.slow   # PHISEARCH_SLOW=1 and CI run it
def test_killed_distributed_build_resumes_to_the_exact_set(setup, tmp_path):
    """SIGKILL every rank once a shard is recorded, while rank 0's second shard (part 2) waits
    halfway (a Gate: the build cannot finish first); the rerun finishes the rest, no
    duplicates."""
    store = StoreConfig(path=str(tmp_path / "s"))
    records = Path(store.path) / store.collection / "docs" / "shards.json"
    shards = [str(setup["root"] / "shards" / f"part-{i:06d}.tar") for i in range(3)]
    env = dict(os.environ, PHISEARCH_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    with Gate(tmp_path / "gate") as gate:
        data = [*shards[:2], gate.url(shards[2], sample_offset(shards[2], SIZES[2] // 2))]
        args = [x for url in data for x in ("--data", url)]
        args += ["--checkpoint", setup["ckpt"], "--draws", "16", "--batch-size", "2",
                 "--workers", "0", "--device", "cpu", "--store", store.path]
        proc = subprocess.Popen(TORCHRUN + ["2", "-m", "phisearch.ui", "build"] + args, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)   # its own group: the kill reaches all
        done_at_kill = 0
        if gate.wait(proc):
            deadline = time.monotonic() + 120   # a failure bound
            while done_at_kill < 1 and time.monotonic() < deadline:
                try:
                    done_at_kill = len(json.loads(records.read_text()))
                except (OSError, ValueError):
                    pass
                time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert 1 <= done_at_kill < 3
    r = torchrun(2, args + ["--json"])
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["shards_already_done"] >= done_at_kill and summary["points"] == 100
    points, shards_doc = snapshot(store)
    assert len(points) == 100 and len(shards_doc) == 3
    assert sum(rec["indexed"] for rec in shards_doc.values()) == 100


def test_folders_are_refused_before_any_rank_starts(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")   # as torchrun sets it; no process group is made
    cfg = BuildConfig(data=(str(setup["root"] / "shards"),), store=StoreConfig(path=str(tmp_path)),
                      checkpoint=setup["ckpt"], device="cpu")
    with pytest.raises(StoreError, match="takes shards, not folders"):
        build_distributed(cfg)
