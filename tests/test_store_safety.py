"""Nothing lost, nothing locked: the embedded store under concurrent opens and kills.

- No phisearch process calls EdgeShard.load while another holds the collection (the upstream
  bug in docs/upstream/edge-load-during-close.md loses all but the last batch when one does).
- A real `idx build` hammered by other processes opening the store keeps every point.
- `kill -9` and SIGTERM of a default-workers build at several moments leave a store that opens
  within 5 s (no orphaned loader worker holds it) and a resume that is exact.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from phisearch.indexer.sources.shards import read_shard
from phisearch.indexer.store import StoreConfig, open_store, point_id
from test_build import split_shard

IDX = [sys.executable, "-m", "phisearch.ui"]
ENV = dict(os.environ, PHISEARCH_NO_PROGRESS="1")

# Process A holds a collection, upserts in batches, tells B it is about to close, closes and
# writes when close() returned. Process B opens the same collection through our open path with
# EdgeShard.load wrapped to record when it is called.
OWNER = """
import json, sys, time
import numpy as np
from phisearch.indexer.store import PointData, StoreConfig, open_store, point_id
path, n, flag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = open_store(StoreConfig(path=path, collection="c"))
s.ensure({"dim": 8, "model_sha256": "m", "readout": "mid", "readout_sha256": None,
          "sigma": 0.2, "draws": 1, "seed": 0})
open(flag + ".holding", "w").close()
while not __import__("os").path.exists(flag + ".waiting"):
    time.sleep(0.01)
rng = np.random.default_rng(0)
for i in range(0, n, 16):
    s.upsert([PointData(id=point_id("d", str(j)), vector=rng.normal(size=8).astype("float32"),
                        sparse_indices=[0], sparse_values=[1.0], payload={"key": str(j)})
              for j in range(i, min(n, i + 16))])
    time.sleep(0.002)
time.sleep(0.5)   # B is certainly waiting now
s.close()
open(flag + ".closed", "w").write(repr(time.time()))
"""

OPENER = """
import os, sys, time
import qdrant_edge as qe
from phisearch.indexer.store import StoreConfig, open_store
path, flag = sys.argv[1], sys.argv[2]
calls = []
real = qe.EdgeShard.load
class Spy:
    @staticmethod
    def load(*a, **k):
        calls.append(time.time())
        return real(*a, **k)
qe.EdgeShard = type("EdgeShard", (), {"load": Spy.load, "create": qe.EdgeShard.create})
while not os.path.exists(flag + ".holding"):
    time.sleep(0.01)
open(flag + ".waiting", "w").close()
with open_store(StoreConfig(path=path, collection="c", busy_wait=60)) as s:
    n = s.count()
print(n, calls[0] if calls else None)
"""


def test_open_waits_for_the_lock_and_never_loads_a_held_shard(tmp_path):
    """Deterministic: B starts opening while A holds the collection and keeps trying through A's
    close(). B's first EdgeShard.load happens after A's close() returned, and sees every point."""
    flag = str(tmp_path / "flag")
    store = str(tmp_path / "store")
    a = subprocess.Popen([sys.executable, "-c", OWNER, store, "600", flag], env=ENV)
    b = subprocess.run([sys.executable, "-c", OPENER, store, flag], env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert a.wait(timeout=60) == 0
    assert b.returncode == 0, b.stderr[-2000:]
    count, first_load = b.stdout.split()
    closed_at = float(Path(flag + ".closed").read_text())
    assert first_load != "None" and float(first_load) >= closed_at
    assert int(count) == 600


def test_the_lock_lives_outside_the_collection_and_names_its_holder(tmp_path):
    cfg = StoreConfig(path=str(tmp_path), collection="c", busy_wait=0.2)
    with open_store(cfg) as s:
        s.ensure({"dim": 4, "model_sha256": "m", "readout": "mid", "readout_sha256": None,
                  "sigma": 0.2, "draws": 1, "seed": 0})
        note = json.loads((tmp_path / ".locks" / "c.lock").read_text())
        assert note["pid"] == os.getpid()
        from phisearch.indexer.store import StoreBusy

        with pytest.raises(StoreBusy, match=f"pid {os.getpid()}"):
            open_store(cfg)
        s.drop()   # deleting the collection keeps the lock file (waiters hold it open)
        assert (tmp_path / ".locks" / "c.lock").exists() and not (tmp_path / "c").exists()
    assert (tmp_path / ".locks" / "c.lock").read_text() == ""


# ------------------------------------------------------------------ a build under fire

HAMMER = """
import sys, time
from phisearch.indexer.store import StoreBusy, StoreConfig, open_store
path, until = sys.argv[1], float(sys.argv[2])
opened = busy = 0
cfg = StoreConfig(path=path, collection="phisearch", busy_wait=0.0)
while time.time() < until:
    try:
        with open_store(cfg) as s:
            s.count()
        opened += 1
    except StoreBusy:
        busy += 1
print(opened, busy)
"""


def split_in_four(src: str, folder: Path) -> tuple[str, set[str]]:
    """`src` split in 4 shards; the point ids a complete build must hold."""
    split_shard(src, folder, 4)
    ids = {point_id("imagenette-64", r["__key__"]) for r in read_shard(src)
           if isinstance(r, dict)}
    (folder / "manifest.json").write_text(json.dumps({"name": "imagenette-64"}))
    return str(folder / "part-{000000..000003}.tar"), ids


@pytest.fixture(scope="module")
def parts(tmp_path_factory, mini_shard) -> tuple[str, set[str]]:
    """The mini shard (100 images) in 4 shards."""
    return split_in_four(mini_shard, tmp_path_factory.mktemp("parts"))


@pytest.fixture(scope="module")
def big_parts(tmp_path_factory, data_dir) -> tuple[str, set[str]]:
    """A 1,000-image test shard in 4 shards: the upstream loss needs a few hundred points in
    the WAL (100 never lost any; 500 did)."""
    return split_in_four(str(data_dir / "imagenette-test-000000.tar"),
                         tmp_path_factory.mktemp("big"))


def build_cmd(data: str, store: str, ckpt_path: str, *extra: str, draws: int = 8,
              batch: int = 4) -> list[str]:
    # default --workers (1): the loader worker is a real separate process
    return IDX + ["build", "--data", data, "--store", store, "--checkpoint", ckpt_path,
                  "--draws", str(draws), "--batch-size", str(batch), "--device", "cpu", *extra]


def stored_ids(store: str) -> list[str]:
    with open_store(StoreConfig(path=store, busy_wait=5)) as s:
        return [h.id for h in s.scroll()]


def hammer_run(tmp_path: Path, parts, tiny_ckpt: str, hammers: int) -> tuple[int, int]:
    data, ids = parts
    store = str(tmp_path / "store")
    build = subprocess.Popen(build_cmd(data, store, tiny_ckpt, "--json", draws=2, batch=16),
                             env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    until = time.time() + 120
    hs = [subprocess.Popen([sys.executable, "-c", HAMMER, store, str(until)], env=ENV,
                           stdout=subprocess.PIPE, text=True) for _ in range(hammers)]
    out, err = build.communicate(timeout=300)
    # stop the hammers a little after the build: their opens straddle its final close()
    time.sleep(1.0)
    for h in hs:
        h.send_signal(signal.SIGKILL)
        h.wait()
    assert build.returncode == 0, err[-2000:]
    assert json.loads(out)["points"] == len(ids)
    got = stored_ids(store)
    assert len(got) == len(set(got)) and set(got) == ids
    return len(got), len(ids)


def test_build_hammered_by_other_processes_keeps_every_point(tmp_path, big_parts, tiny_ckpt):
    hammer_run(tmp_path, big_parts, tiny_ckpt, hammers=3)


@pytest.mark.slow
def test_build_hammered_many_times(tmp_path, big_parts, tiny_ckpt):
    for r in range(10):
        hammer_run(tmp_path / f"r{r}", big_parts, tiny_ckpt, hammers=4)


# ------------------------------------------------------------------ kills

def descendants(pid: int) -> set[int]:
    """The process tree under pid (children, their children...), from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def alive(pids: set[int]) -> set[int]:
    out = set()
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(p)
    return out


def _doc(store: str, name: str) -> dict | None:
    try:
        return json.loads((Path(store) / "phisearch" / "docs" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def wait_for_moment(moment: str, store: str, proc: subprocess.Popen, delay: float) -> bool:
    """Block until the build reaches `moment`, judged from what it writes on disk."""
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        last, shards = _doc(store, "last_run"), _doc(store, "shards") or {}
        if moment == "startup" and time.time() - proc.start_time > delay:
            return True
        if moment == "mid_shard" and last and "running_since" in last and not shards:
            time.sleep(delay)
            return True
        if moment == "between_shards" and 1 <= len(shards) < 4:
            return True
        if moment == "final_close" and last and "finished_at" in last:
            return True
        if moment == "random" and time.time() - proc.start_time > delay:
            return True
        time.sleep(0.005)
    return False


def kill_then_resume(tmp_path: Path, parts, tiny_ckpt: str, moment: str, sig: int,
                     delay: float = 0.0) -> dict:
    data, ids = parts
    store = str(tmp_path / "store")
    proc = subprocess.Popen(build_cmd(data, store, tiny_ckpt, "--json"), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.start_time = time.time()
    reached = wait_for_moment(moment, store, proc, delay)
    tree = descendants(proc.pid)
    proc.send_signal(sig)
    t_kill = time.monotonic()
    # Every process that inherited the build's stdout (forkserver, resource tracker, loader
    # workers, even one forked after `tree` was read) has exited when communicate() returns.
    # SIGKILL: within 5 s; SIGTERM: the build first finishes its batch and closes the store.
    limit = 5 if sig == signal.SIGKILL else 20
    try:
        _, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        left = alive(descendants(proc.pid) | tree)
        proc.kill()
        pytest.fail(f"{moment}: processes still holding the build's pipes after {limit} s: "
                    f"{sorted(left)}")
    while alive(tree) and time.monotonic() - t_kill < limit:   # fds closed, exit finishing
        time.sleep(0.02)
    assert not alive(tree), f"orphans after {moment}: {alive(tree)}"
    # ...and the store opens within 5 s of the kill (or was never created).
    if (Path(store) / "phisearch" / "shard").exists():
        with open_store(StoreConfig(path=store, busy_wait=5.0)) as s:
            s.count()
        assert time.monotonic() - t_kill < limit + 1
    r = subprocess.run(build_cmd(data, store, tiny_ckpt, "--json"), env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    got = stored_ids(store)
    assert len(got) == len(set(got)) == len(ids) and set(got) == ids, moment
    assert summary["points"] == len(ids)
    st = subprocess.run(IDX + ["status", "--store", store, "--json"], env=ENV,
                        capture_output=True, text=True, timeout=60)
    assert json.loads(st.stdout)["shards_done"] == 4
    return dict(moment=moment, reached=reached, killed_rc=proc.returncode, tree=len(tree),
                stderr=err[-300:])


MOMENTS = ["startup", "mid_shard", "between_shards", "final_close"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill9", "term"])
@pytest.mark.parametrize("moment", MOMENTS)
def test_killed_build_leaves_an_openable_store_and_resumes_exactly(tmp_path, parts, tiny_ckpt,
                                                                   moment, sig):
    out = kill_then_resume(tmp_path, parts, tiny_ckpt, moment, sig, delay=1.5)
    assert out["reached"], out
    if moment in ("mid_shard", "between_shards"):
        assert out["tree"] >= 2, out   # the forkserver and a loader worker were running


def _random_kills(tmp_path: Path, parts, tiny_ckpt: str, n: int) -> None:
    rng = random.Random(int(os.environ.get("PHISEARCH_KILL_SEED", "0")))
    for i in range(n):
        sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
        kill_then_resume(tmp_path / f"k{i}", parts, tiny_ckpt, "random", sig,
                         delay=rng.uniform(0.5, 12.0))


def test_random_kill_times(tmp_path, parts, tiny_ckpt):
    _random_kills(tmp_path, parts, tiny_ckpt, 3)


@pytest.mark.slow
def test_twenty_random_kill_times(tmp_path, parts, tiny_ckpt):
    _random_kills(tmp_path, parts, tiny_ckpt, 20)
