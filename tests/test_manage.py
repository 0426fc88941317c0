"""idx remove, snapshots and aliases on a real Edge store built from the real mini shard."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_idx
from phisearch.indexer.ingest.pipeline import BuildConfig, build
from phisearch.indexer.manage.aliases import list_aliases, overview, set_alias
from phisearch.indexer.manage.remove import remove, selection
from phisearch.indexer.manage.snapshots import create, list_snapshots, restore
from phisearch.indexer.model.config import PhiConfig
from phisearch.indexer.store import SHARDS_DOC, StoreBusy, StoreConfig, StoreError, open_store

ENV = dict(os.environ, PHISEARCH_NO_PROGRESS="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, mini_shard, tiny_ckpt) -> Path:
    """A store with two collections of the mini shard: `a` (σ 0.2) and `b` (σ 0.4)."""
    root = tmp_path_factory.mktemp("pristine") / "store"
    for name, sigma in (("a", 0.2), ("b", 0.4)):
        build(BuildConfig(data=(mini_shard,), store=StoreConfig(path=str(root), collection=name),
                          checkpoint=tiny_ckpt, phi=PhiConfig(sigma=sigma, draws=1, seed=0),
                          batch_size=50, workers=0, device="cpu"))
    return root


@pytest.fixture
def store_root(pristine, tmp_path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(pristine, root)
    return root


def dump(cfg: StoreConfig) -> dict:
    """Every point (id -> vector, sparse, payload), the metadata and the docs."""
    with open_store(cfg) as st:
        points = {h.id: (h.vector.tolist(), h.sparse, h.payload)
                  for h in st.scroll(with_vectors=True)}
        docs = {d: st.get_doc(d) for d in (SHARDS_DOC, "last_run", "clusters")}
        return {"points": points, "meta": st.meta(), "docs": docs}


def test_remove_by_key_label_and_shard_clears_resume_records(store_root, mini_shard, tiny_ckpt):
    cfg = StoreConfig(path=str(store_root), collection="a")
    with open_store(cfg) as st:
        key = next(st.scroll({"label": 0})).payload["key"]
    asked: list[int] = []
    out = remove(cfg, selection(key=key), confirm=lambda n: asked.append(n) or False)
    assert asked == [1] and out["deleted"] == 0          # declined: nothing changes
    out = remove(cfg, selection(filter_json='{"label": 3}'), dry_run=True)
    assert out == dict(out, matched=10, deleted=0)
    out = remove(cfg, selection(filter_json='{"label": 3}'))
    assert out["deleted"] == 10 and out["records_removed"] == [mini_shard]
    with open_store(cfg) as st:
        assert st.count() == 90 and st.count({"label": 3}) == 0
        assert st.get_doc(SHARDS_DOC) == {}
    # The shard is no longer recorded as done, so a rebuild puts the 10 points back, once.
    again = build(BuildConfig(data=(mini_shard,), store=cfg, checkpoint=tiny_ckpt,
                              phi=PhiConfig(sigma=0.2, draws=1, seed=0), batch_size=50,
                              workers=0, device="cpu"))
    assert again["indexed"] == 100 and again["points"] == 100
    out = remove(cfg, selection(shard=os.path.basename(mini_shard)))
    assert out["deleted"] == 100
    with pytest.raises(StoreError, match="say what to remove"):
        selection()
    with pytest.raises(StoreError, match="not valid JSON"):
        selection(filter_json="{label: 3}")


def test_snapshot_remove_half_restore_gives_back_everything(store_root):
    cfg = StoreConfig(path=str(store_root), collection="a")
    before = dump(cfg)
    assert len(before["points"]) == 100
    info = create(cfg)
    assert info["points"] == 100 and Path(info["path"]).is_file()
    assert [s["name"] for s in list_snapshots(cfg)] == [info["name"]]
    with open_store(cfg) as st:
        half = sorted(before["points"])[:50]
        assert st.delete(ids=half) == 50
        st.put_doc(SHARDS_DOC, {})
    assert len(dump(cfg)["points"]) == 50
    out = restore(cfg, info["name"])
    assert out["points"] == 100
    after = dump(cfg)
    assert after["meta"] == before["meta"] and after["docs"] == before["docs"]
    assert after["points"].keys() == before["points"].keys()
    for pid, (vec, sparse, payload) in before["points"].items():
        vec2, sparse2, payload2 = after["points"][pid]
        np.testing.assert_array_equal(vec2, vec)
        assert sparse2 == sparse and payload2 == payload
    with pytest.raises(StoreError, match="no snapshot nope"):
        restore(cfg, "nope")
    # The collection `b` beside it is untouched by a restore of `a`.
    assert len(dump(StoreConfig(path=str(store_root), collection="b"))["points"]) == 100


def test_snapshot_refused_while_a_build_holds_the_store(store_root):
    cfg = StoreConfig(path=str(store_root), collection="a", busy_wait=0.5)
    holder = open_store(cfg)      # stands in for a running idx build: the one Edge handle
    try:
        with pytest.raises(StoreBusy, match="in use by another process"):
            create(cfg)
        with pytest.raises(StoreBusy):
            restore(cfg, "whatever")
        assert list_snapshots(cfg) == []   # listing needs no handle
    finally:
        holder.close()


def test_alias_switch_while_another_process_queries(store_root):
    with pytest.raises(StoreError, match="no collection nope"):
        set_alias(StoreConfig(path=str(store_root)), "live", "nope")
    with pytest.raises(StoreError, match="cannot shadow"):
        set_alias(StoreConfig(path=str(store_root)), "b", "a")
    assert set_alias(StoreConfig(path=str(store_root)), "live", "a") is None
    log = store_root.parent / "queries.jsonl"
    # Another process queries `live` in a loop (open, search, close), as the UI and idx query do.
    script = textwrap.dedent(f"""
        import json, time
        from phisearch.indexer.store import StoreConfig, open_store
        cfg = StoreConfig(path={str(store_root)!r}, collection="live", busy_wait=60)
        t_end = time.time() + 300   # a failure bound: it stops when it sees the switch
        with open({str(log)!r}, "w") as f:
            while time.time() < t_end:
                with open_store(cfg) as st:
                    meta = st.meta()
                    hit = next(st.scroll(with_vectors=True))
                    hits = st.search(hit.vector, limit=3)
                    f.write(json.dumps({{"sigma": meta["sigma"], "n": len(hits),
                                         "d0": hits[0].distance}}) + "\\n")
                    f.flush()
                if meta["sigma"] == 0.4:
                    break
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=ENV)
    try:
        deadline = time.time() + 120   # a failure bound
        while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
            time.sleep(0.1)
        assert set_alias(StoreConfig(path=str(store_root)), "live", "b") == "a"
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    sigmas = [r["sigma"] for r in rows]
    assert sigmas[0] == 0.2 and sigmas[-1] == 0.4, sigmas
    assert sigmas == sorted(sigmas)                  # switched once, never back
    assert all(r["n"] == 3 and r["d0"] < 1e-4 for r in rows)
    assert list_aliases(StoreConfig(path=str(store_root))) == {"live": "b"}
    cols = {c["name"]: c for c in overview(StoreConfig(path=str(store_root)))}
    assert cols["b"]["aliases"] == ["live"] and cols["a"]["aliases"] == []
    assert cols["a"]["sigma"] == 0.2 and cols["b"]["sigma"] == 0.4


def test_cli_remove_snapshot_alias_and_exit_codes(store_root):
    store = ["--store", str(store_root)]

    idx = run_idx    # in this process; stdin is not a terminal here either

    r = idx("remove", "--label", "3", *store)
    assert r.returncode == 2 and "Traceback" not in r.stderr          # usage error
    r = idx("remove", *store, "--collection", "a")                    # no selector: usage
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: say what to remove: --key, --shard, --dataset or --filter"]
    r = idx("remove", "--filter", "not json", *store, "--collection", "a")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    r = idx("remove", "--filter", "[1, 2]", *store, "--collection", "a")
    assert r.returncode == 2 and "JSON object" in r.stderr
    r = idx("remove", "--filter", '{"label": 3}', *store, "--collection", "a")
    assert r.returncode == 1 and "pass --yes" in r.stderr             # no prompt without a tty
    r = idx("remove", "--filter", '{"label": 3}', "--yes", "--json", *store, "--collection", "a")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["deleted"] == 10
    r = idx("snapshot", "create", "--json", *store, "--collection", "a")
    assert r.returncode == 0, r.stderr
    name = json.loads(r.stdout)["name"]
    assert json.loads(idx("snapshot", "list", "--json", *store, "--collection", "a").stdout
                      )["snapshots"][0]["points"] == 90
    r = idx("snapshot", "restore", "nope", "--yes", *store, "--collection", "a")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    r = idx("alias", "set", "live", "b", *store)
    assert r.returncode == 0, r.stderr
    st = json.loads(idx("status", "--json", *store, "--collection", "live").stdout)
    assert st["sigma"] == 0.4 and st["points"] == 100
    assert {c["name"]: c["aliases"] for c in st["collections"]} == {"a": [], "b": ["live"]}
    assert name.startswith("a-")


def test_remove_from_a_folder_source_lets_the_next_sync_restore_it(tmp_path, mini_shard,
                                                                    tiny_ckpt):
    from phisearch.indexer.sources import images
    from phisearch.indexer.sources.shards import read_shard
    from PIL import Image

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    raws = [r for r in read_shard(mini_shard) if isinstance(r, dict)][:4]
    for i, raw in enumerate(raws):
        Image.fromarray(images.decode(raw["jpg"])).save(folder / ("sub" if i % 2 else "")
                                                        / f"p{i}.png")
    cfg = StoreConfig(path=str(tmp_path / "store"), collection="mine")

    def sync() -> dict:
        return build(BuildConfig(data=(str(folder),), store=cfg, checkpoint=tiny_ckpt,
                                 phi=PhiConfig(sigma=0.2, draws=1, seed=0), batch_size=8,
                                 workers=0, device="cpu"))

    assert sync()["indexed"] == 4
    out = remove(cfg, selection(key="sub/p1.png"))
    assert out["deleted"] == 1 and out["records_removed"] == [f"{folder.resolve()}/sub/p1.png"]
    with open_store(cfg) as st:
        assert st.count() == 3
    again = sync()   # the file is still there and no longer recorded: indexed again, alone
    assert again["indexed"] == 1
    with open_store(cfg) as st:
        assert st.count() == 4 and st.count({"key": "sub/p1.png"}) == 1


# A snapshot operation killed at a chosen step: `rename N` dies at the Nth Path.rename (restore:
# 1 = after the journal, before the live folder moves; 2 = between the two renames), `extract`
# dies after unpacking the archive, `archive` dies before the finished archive is renamed.
KILL_AT = """
import os, sys, tarfile, pathlib
from phisearch.indexer.manage.snapshots import create, restore
from phisearch.indexer.store import StoreConfig
root, op, step, name = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
if step.startswith("rename"):
    n, real = int(step.split()[1]), pathlib.Path.rename
    calls = [0]
    def rename(self, target):
        calls[0] += 1
        if calls[0] == n:
            os._exit(137)
        return real(self, target)
    pathlib.Path.rename = rename
elif step == "extract":
    real_x = tarfile.TarFile.extractall
    def extractall(self, *a, **k):
        real_x(self, *a, **k)
        os._exit(137)
    tarfile.TarFile.extractall = extractall
cfg = StoreConfig(path=root, collection="a")
create(cfg) if op == "create" else restore(cfg, name)
"""


@pytest.mark.parametrize("step,points", [("extract", 50), ("rename 1", 50), ("rename 2", 100)])
def test_killed_restore_leaves_a_usable_store(store_root, step, points):
    """Killed while unpacking, or after the journal but before the live folder moved: the live
    collection is untouched (50 points) and the next open drops the staged copy. Killed between
    the two renames: the next open finishes the swap (the snapshot's 100 points). Nothing
    temporary is left."""
    cfg = StoreConfig(path=str(store_root), collection="a")
    info = create(cfg)
    with open_store(cfg) as st:
        assert st.delete(ids=sorted(h.id for h in st.scroll())[:50]) == 50
    r = subprocess.run([sys.executable, "-c", KILL_AT, str(store_root), "restore", step,
                        info["name"]], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 137, r.stderr[-2000:]
    left = sorted(p.name for p in store_root.iterdir() if p.name.startswith((".restore",
                                                                             ".trash", ".swap")))
    assert left, "the kill should have left temporaries for the next open to deal with"
    with open_store(cfg) as st:
        assert st.count() == points
    assert not [p for p in store_root.iterdir()
                if p.name.startswith((".restore", ".trash", ".swap"))]
    assert len(dump(StoreConfig(path=str(store_root), collection="b"))["points"]) == 100


def test_killed_snapshot_create_leaves_no_temporary(store_root):
    r = subprocess.run([sys.executable, "-c", KILL_AT, str(store_root), "create", "rename 1",
                        "-"], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 137, r.stderr[-2000:]
    snaps = store_root / ".snapshots" / "a"
    assert [p.name for p in snaps.iterdir() if p.name.endswith(".tmp")]
    assert list_snapshots(StoreConfig(path=str(store_root), collection="a")) == []
    with open_store(StoreConfig(path=str(store_root), collection="a")) as st:
        assert st.count() == 100
    assert not [p for p in snaps.iterdir() if p.name.endswith(".tmp")]


def test_readers_see_an_alias_as_its_collection(store_root, capsys):
    """`idx serve` / `idx ui` warn when their collection is missing; an alias of a real
    collection is not missing (they used to look for <store>/<alias>/meta.json)."""
    from phisearch.indexer.cli.common import warn_if_missing

    set_alias(StoreConfig(path=str(store_root), collection="a"), "live", "a")
    warn_if_missing(StoreConfig(path=str(store_root), collection="live"), "x")
    warn_if_missing(StoreConfig(path=str(store_root), collection="a"), "x")
    assert capsys.readouterr().err == ""
    warn_if_missing(StoreConfig(path=str(store_root), collection="nope"), "x")
    assert "no collection nope" in capsys.readouterr().err
