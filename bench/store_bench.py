"""Store benchmark: upsert points/s and dense / sparse top-10 query latency (p50, p99) at several
collection sizes, through phisearch's store layer (Qdrant Edge by default, a server with --url).

Vectors are synthetic but φ-like: non-negative, about 30% of channels zero (ReLU outputs), a few
strong "selective" channels per point. Prints a table and writes JSON.

    python bench/store_bench.py --sizes 10000 100000 1000000 --out bench/results/store_bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from phisearch.indexer.store import PointData, StoreConfig, open_store, point_id


def phi_like(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    base = rng.normal(0.2, 0.35, size=(n, dim)).astype(np.float32)
    sel = rng.integers(0, dim, size=(n, 4))
    base[np.arange(n)[:, None], sel] += rng.exponential(1.5, size=(n, 4)).astype(np.float32)
    return np.maximum(base, 0.0)


def points(vecs: np.ndarray, start: int) -> list[PointData]:
    out = []
    for i, v in enumerate(vecs):
        idx = np.flatnonzero(v)
        out.append(PointData(id=point_id("bench", f"k{start + i}"), vector=v,
                             sparse_indices=idx.tolist(), sparse_values=v[idx].tolist(),
                             payload={"key": f"k{start + i}", "label": int((start + i) % 10),
                                      "shard": f"s{(start + i) // 1000}", "dataset": "bench"}))
    return out


def pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(xs) * 1000, q)), 3)


def run(size: int, dim: int, cfg: StoreConfig, queries: int, batch: int) -> dict:
    rng = np.random.default_rng(size)
    meta = {"model_sha256": "bench", "readout": "mid", "readout_sha256": "bench", "sigma": 0.2,
            "draws": 4, "seed": 0, "schema_version": 1, "dim": dim}
    with open_store(cfg) as st:
        st.ensure(meta)
        t0 = time.perf_counter()
        for start in range(0, size, batch):
            st.upsert(points(phi_like(rng, min(batch, size - start), dim), start))
        upsert_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        st.optimize()
        optimize_s = time.perf_counter() - t0
        qs = phi_like(rng, queries, dim)
        dense, sparse, filtered = [], [], []
        for q in qs:
            t0 = time.perf_counter()
            st.search(q, limit=10)
            dense.append(time.perf_counter() - t0)
            idx = np.flatnonzero(q)[:8]  # "which images use these channels"
            t0 = time.perf_counter()
            st.search_sparse(idx.tolist(), q[idx].tolist(), limit=10)
            sparse.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            st.search(q, limit=10, filter={"label": 3})
            filtered.append(time.perf_counter() - t0)
        count = st.count()
    return {"points": size, "count": count, "dim": dim,
            "upsert_points_per_s": round(size / upsert_s, 1), "upsert_s": round(upsert_s, 2),
            "optimize_s": round(optimize_s, 2),
            "dense_ms_p50": pct(dense, 50), "dense_ms_p99": pct(dense, 99),
            "dense_label_filter_ms_p50": pct(filtered, 50),
            "dense_label_filter_ms_p99": pct(filtered, 99),
            "sparse_ms_p50": pct(sparse, 50), "sparse_ms_p99": pct(sparse, 99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dim", type=int, default=256, help="small64's middle block has 256")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--url", default=None, help="a Qdrant server instead of Edge")
    ap.add_argument("--out", default="bench/results/store_bench.json")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    results = []
    for size in args.sizes:
        tmp = tempfile.mkdtemp(prefix="phisearch-bench-")
        cfg = (StoreConfig(url=args.url, collection=f"bench_{size}") if args.url
               else StoreConfig(path=tmp, collection="bench"))
        try:
            r = run(size, args.dim, cfg, args.queries, args.batch)
        finally:
            if args.url:
                with open_store(cfg) as st:
                    st.drop()
            shutil.rmtree(tmp, ignore_errors=True)
        results.append(r)
        print(f"{r['points']:>9,} pts  upsert {r['upsert_points_per_s']:>9,.0f} pts/s  "
              f"optimize {r['optimize_s']:>6.1f} s  dense p50/p99 {r['dense_ms_p50']:.2f}/"
              f"{r['dense_ms_p99']:.2f} ms  filtered {r['dense_label_filter_ms_p50']:.2f}/"
              f"{r['dense_label_filter_ms_p99']:.2f} ms  sparse {r['sparse_ms_p50']:.2f}/"
              f"{r['sparse_ms_p99']:.2f} ms", flush=True)
    out = {"benchmark": "store", "backend": "server" if args.url else "edge",
           "host": platform.node(), "cpu_count": __import__("os").cpu_count(),
           "note": args.note, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
