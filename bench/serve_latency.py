"""`idx serve` latency: p50/p90/p99 of /search by upload, /search by point id and /phi, on a real
index and on a synthetic 1M-point collection, sequential and with 8 concurrent clients; and where
the time of one upload goes (decode, φ, query, JSON), so the next change is chosen by measurement.

    .venv/bin/python bench/serve_latency.py --store ~/.phisearch/store            # the real index
    .venv/bin/python bench/serve_latency.py --synthetic 1000000 --synthetic-store /tmp/syn \
        --prepare-only          # build and optimize the 1M collection first (an hour on 1 core)
    .venv/bin/python bench/serve_latency.py --synthetic 1000000 --synthetic-store /tmp/syn

The synthetic collection copies the real collection's metadata (so uploads are embedded with the
same model and readout) and holds random unit vectors of the same dimension with sparse vectors
of ~100 channels and a small payload. serve runs in this process (uvicorn in a thread), with its
defaults: the Edge collection held between requests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from test_serve import serving  # noqa: E402 - uvicorn in a thread, the tests' helper

from phisearch.indexer.sources import images  # noqa: E402
from phisearch.indexer.sources.shards import read_shard  # noqa: E402
from phisearch.indexer.store import PointData, StoreConfig, open_store  # noqa: E402
from phisearch.search.serve import Service, ServeConfig, create_app  # noqa: E402

OPTIMIZED = "synthetic-optimized"   # marker beside the synthetic collection
DATA = Path(os.environ.get("PHISEARCH_DATA", REPO.parent / "shared" / "data")) / "imagenette-64"


def pct(xs: list[float]) -> dict:
    xs = sorted(xs)
    q = lambda p: xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]  # noqa: E731
    return {"n": len(xs), "p50_ms": round(1000 * q(0.5), 1), "p90_ms": round(1000 * q(0.9), 1),
            "p99_ms": round(1000 * q(0.99), 1), "mean_ms": round(1000 * statistics.mean(xs), 1)}


def timed(fn, n: int, clients: int) -> dict:
    """n calls of fn(client) in total, from `clients` threads; latency of each."""
    lat: list[float] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        with httpx.Client(timeout=60) as c:
            for _ in range(k):
                t0 = time.perf_counter()
                r = fn(c)
                dt = time.perf_counter() - t0
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                with lock:
                    lat.append(dt)

    per = [n // clients + (i < n % clients) for i in range(clients)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(worker, per))
    out = pct(lat)
    out["throughput_rps"] = round(n / (time.perf_counter() - t0), 1)
    return out


def breakdown(cfg: StoreConfig, jpg: bytes, n: int = 30) -> dict:
    """Where one upload's time goes, in-process, with the store and the model warm."""
    svc = Service(ServeConfig(store=cfg))
    meta = svc.read(lambda st, m: m)
    emb = svc.embedder(meta)
    parts: dict[str, list[float]] = {"decode": [], "phi": [], "query": [], "json": []}
    from phisearch.search import query as q

    for _ in range(n):
        t0 = time.perf_counter()
        img = images.decode(jpg)
        t1 = time.perf_counter()
        dense, mid = emb(img[None])
        t2 = time.perf_counter()
        with svc.store() as st:
            hits = q.search(st, q.Target(dense[0], mid[0]), 10, None)
        t3 = time.perf_counter()
        json.dumps({"hits": [q.hit_json(h) for h in hits]})
        t4 = time.perf_counter()
        for k, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[k].append(dt)
    svc.close()
    return {k: round(1000 * statistics.median(v), 2) for k, v in parts.items()}


def handover(cfg: StoreConfig, url: str, request, n: int = 10) -> dict:
    """How long a writer waits for serve, which holds the collection, to let go (after a request,
    then 0.3 s idle); then the next request, which opens the collection again."""
    give, back = [], []
    with httpx.Client(timeout=60) as c:
        for _ in range(n):
            request(c)
            time.sleep(0.3)
            t0 = time.perf_counter()
            writer = open_store(StoreConfig(path=cfg.path, collection=cfg.collection,
                                            busy_wait=10))
            give.append(time.perf_counter() - t0)
            writer.close()
            t0 = time.perf_counter()
            if request(c).status_code != 200:
                raise RuntimeError("serve did not take the collection back")
            back.append(time.perf_counter() - t0)
    return {"writer_waits": pct(give), "next_request": pct(back)}


def synthetic(src: StoreConfig, dst: StoreConfig, n: int) -> None:
    """A collection of n random points with src's metadata (skipped when it is there)."""
    with open_store(src) as s:
        meta = s.meta()
    with open_store(dst) as d:
        if d.meta() is not None and d.count() >= n and Path(dst.path, OPTIMIZED).exists():
            return
        d.ensure(meta)
        rng = np.random.default_rng(0)
        dim, sparse_dim = meta["dim"], meta.get("sparse_dim", 256)
        t0 = time.perf_counter()
        for i in range(d.count(), n, 4096):
            k = min(4096, n - i)
            v = rng.normal(size=(k, dim)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            pts = []
            for j in range(k):
                idx = np.sort(rng.choice(sparse_dim, 100, replace=False))
                pts.append(PointData(id=f"00000000-0000-4000-8000-{i + j:012d}", vector=v[j],
                                     sparse_indices=idx.tolist(),
                                     sparse_values=rng.random(100).tolist(),
                                     payload={"key": f"syn{i + j}", "label": int((i + j) % 10),
                                              "dataset": "synthetic"}))
            d.upsert(pts)
            print(f"synthetic: {i + k} points, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        t0 = time.perf_counter()
        d.optimize()
        print(f"optimize: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    Path(dst.path, OPTIMIZED).write_text(f"{n}\n")   # an interrupted optimize runs again


def run(cfg: StoreConfig, label: str, jpg: bytes, n: int) -> dict:
    with open_store(cfg) as st:
        points = st.count()
        pid = next(st.scroll()).id
    out = {"points": points, "collection": label}
    with serving(create_app(cfg, warm=True)) as url:
        upload = lambda c: c.post(f"{url}/search", params={"k": 10}, content=jpg)  # noqa: E731
        by_id = lambda c: c.post(f"{url}/search", params={"k": 10, "id": pid})  # noqa: E731
        phi = lambda c: c.post(f"{url}/phi", content=jpg)  # noqa: E731
        for f in (upload, by_id, phi):
            f(httpx.Client(timeout=60))              # warm: model loaded, store open
        for name, fn in (("search_upload", upload), ("search_by_id", by_id), ("phi", phi)):
            out[name] = {"sequential": timed(fn, n, 1), "clients_8": timed(fn, n, 8)}
            print(label, name, json.dumps(out[name]), file=sys.stderr, flush=True)
        out["handover_to_writer"] = handover(cfg, url, by_id)
    out["upload_breakdown_ms"] = breakdown(cfg, jpg)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default=os.path.expanduser("~/.phisearch/store"))
    ap.add_argument("--collection", default="phisearch")
    ap.add_argument("--synthetic", type=int, default=0, help="also a collection of N points")
    ap.add_argument("--synthetic-store", default="/tmp/phisearch-syn")
    ap.add_argument("-n", type=int, default=60, help="requests per measurement")
    ap.add_argument("--prepare-only", action="store_true",
                    help="build (and optimize) the synthetic collection, then stop")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch threads, as `idx serve` has by default (one per core)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "serve_latency.json"))
    args = ap.parse_args()
    # Importing the tests' helper runs tests/conftest.py, which pins torch to 1 thread for the
    # test suite; serve itself runs with torch's default (one thread per core). Measure that.
    torch.set_num_threads(args.threads)
    cfg = StoreConfig(path=args.store, collection=args.collection, busy_wait=1.0)
    raw = next(r for r in read_shard(str(DATA / "imagenette-test-000000.tar"))
               if isinstance(r, dict))
    jpg = raw["jpg"]
    syn = StoreConfig(path=args.synthetic_store, collection="synthetic", busy_wait=1.0)
    if args.prepare_only:
        synthetic(cfg, syn, args.synthetic)
        return
    result = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "runs": [run(cfg, "real", jpg, args.n)]}
    if args.synthetic:
        synthetic(cfg, syn, args.synthetic)
        result["runs"].append(run(syn, f"synthetic {args.synthetic}", jpg, args.n))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
