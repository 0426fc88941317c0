"""Stand-alone reproduction: qdrant-edge-py loses points when another process calls
EdgeShard.load() on a shard while its owner closes it. Needs only qdrant-edge-py.

    python edge_load_during_close.py [--runs 10] [--points 2000] [--batch 16] [--pause 0.01]
                                     [--during close|write|flush|optimize]

Process A creates a shard and upserts `points` points in batches of `batch` (sleeping `pause`
seconds before each batch, as a real writer computing its batches does). Process B calls
EdgeShard.load() on the same path in a tight loop; each attempt fails ("failed to open WAL ...
WouldBlock") while A holds the shard.
  --during close     B spins until a load succeeds, so some attempts land while A is in close()
  --during write     B spins only while A upserts; A stops B, then closes
  --during flush     as write, then A calls flush() ten times while B spins, stops B, closes
  --during optimize  as write, then A calls optimize() while B spins, stops B, closes
At the end the shard is reopened alone and counted. Expected: `points`, every run.
"""

import argparse
import multiprocessing as mp
import shutil
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import qdrant_edge as qe

DIM = 8


def owner(path, n, batch, pause, during, b_ready, started, stop_b, b_stopped) -> None:
    b_ready.wait()
    cfg = qe.EdgeConfig(vectors={"v": qe.EdgeVectorParams(size=DIM, distance=qe.Distance.Euclid)})
    shard = qe.EdgeShard.create(path, cfg)
    started.set()
    for i in range(0, n, batch):
        time.sleep(pause)
        shard.update(qe.UpdateOperation.upsert_points([
            qe.Point(id=j + 1, vector={"v": [float(j)] * DIM}, payload={"j": j})
            for j in range(i, min(n, i + batch))]))
    if during == "flush":
        for _ in range(10):
            shard.flush()
            time.sleep(pause)
    elif during == "optimize":
        shard.optimize()
    if during != "close":
        stop_b.set()
        b_stopped.wait()
    shard.close()


def spinner(path, b_ready, started, stop_b, b_stopped, out) -> None:
    b_ready.set()
    started.wait()
    attempts = blocked = 0
    while not stop_b.is_set():
        attempts += 1
        try:
            shard = qe.EdgeShard.load(path)
        except Exception as e:  # noqa: BLE001 - WouldBlock while the owner holds it
            blocked += "WouldBlock" in str(e)
            continue
        out.put(int(shard.count(qe.CountRequest(exact=True))))
        shard.close()
        break
    out.put((attempts, blocked))
    b_stopped.set()


def run(n: int, batch: int, pause: float, during: str) -> tuple[int, str]:
    tmp = Path(tempfile.mkdtemp())
    path = str(tmp / "shard")
    ctx = mp.get_context("spawn")
    ev = [ctx.Event() for _ in range(4)]   # b_ready, started, stop_b, b_stopped
    out = ctx.Queue()
    a = ctx.Process(target=owner, args=(path, n, batch, pause, during, *ev))
    b = ctx.Process(target=spinner, args=(path, *ev, out))
    a.start()
    b.start()
    a.join()
    ev[2].set()
    b.join()
    seen = []
    while not out.empty():
        seen.append(out.get())
    shard = qe.EdgeShard.load(path)
    count = int(shard.count(qe.CountRequest(exact=True)))
    shard.close()
    shutil.rmtree(tmp)
    stats = seen[-1] if seen else (0, 0)
    note = f"{stats[0]} load() attempts, {stats[1]} WouldBlock"
    if len(seen) == 2:
        note += f", B's successful load counted {seen[0]}"
    return count, note


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pause", type=float, default=0.01)
    ap.add_argument("--during", choices=("close", "write", "flush", "optimize"), default="close")
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    print(f"qdrant-edge-py {version('qdrant-edge-py')}: {args.points} points in batches of "
          f"{args.batch}; a second process spins on load() (--during {args.during})")
    lost = 0
    for r in range(args.runs):
        count, note = run(args.points, args.batch, args.pause, args.during)
        lost += count != args.points
        print(f"run {r}: reopened count {count} (expected {args.points}); {note}", flush=True)
    print(f"{lost} of {args.runs} runs lost points")


if __name__ == "__main__":
    main()
