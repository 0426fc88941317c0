"""Seconds of `idx cluster` (the library call, through an Edge store) at 10k and 100k synthetic
φ-like points: 256-d, a mixture of 50 gaussians through a ReLU (about 30% zeros). HDBSCAN fits
on a sample of --sample-above points and assigns the rest; k-means fits on the same sample.
Other settings are ClusterConfig's defaults; each --preprocess is timed.
Reports per-stage seconds, clusters, noise and NMI against the true mixture components.

    OMP_NUM_THREADS=1 python bench/cluster_scale.py --sizes 10000 100000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from phisearch.indexer.manage.cluster import ClusterConfig, cluster
from phisearch.indexer.store import PointData, StoreConfig, open_store, point_id
from sklearn.metrics import normalized_mutual_info_score as nmi


def phi_like(n: int, dim: int = 256, components: int = 50, seed: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) non-negative vectors and their component (n,)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.3, 0.45, size=(components, dim))
    comp = rng.integers(0, components, n)
    x = centers[comp] + rng.normal(0, 0.35, size=(n, dim))
    return np.maximum(x, 0).astype(np.float32), comp


def fill(cfg: StoreConfig, x: np.ndarray, comp: np.ndarray) -> float:
    meta = {"model_sha256": "bench", "readout": "mid", "readout_sha256": "bench", "sigma": 0.2,
            "draws": 4, "seed": 0, "schema_version": 1, "dim": x.shape[1],
            "sparse_dim": x.shape[1]}
    t0 = time.perf_counter()
    with open_store(cfg) as st:
        st.ensure(meta)
        for s in range(0, len(x), 2048):
            pts = []
            for i in range(s, min(s + 2048, len(x))):
                idx = np.flatnonzero(x[i])
                pts.append(PointData(point_id("bench", f"k{i}"), x[i], idx.tolist(),
                                     x[i, idx].tolist(),
                                     {"key": f"k{i}", "label": int(comp[i]), "dataset": "bench"}))
            st.upsert(pts)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    ap.add_argument("--methods", nargs="+", default=["hdbscan", "kmeans"])
    ap.add_argument("--preprocess", nargs="+", default=["auto"],
                    help="auto | raw | l2 | pca (32 dims); each is timed (auto = pca here: the "
                    "synthetic collection's readout is not whitened)")
    ap.add_argument("--sample-above", type=int, default=20000)
    ap.add_argument("--note", default="")
    ap.add_argument("--out", type=Path, default=Path("bench/results/cluster_scale.json"))
    args = ap.parse_args()
    rows = []
    for n in args.sizes:
        x, comp = phi_like(n)
        tmp = Path(tempfile.mkdtemp(prefix="cluster_scale_"))
        try:
            scfg = StoreConfig(path=str(tmp), collection="bench")
            fill_s = fill(scfg, x, comp)
            for method, prep in ((m, p) for p in args.preprocess for m in args.methods):
                cfg = ClusterConfig(method=method, preprocess=prep, sample_above=args.sample_above)
                res = cluster(scfg, cfg)
                with open_store(scfg) as st:
                    ids = [point_id("bench", f"k{i}") for i in range(n)]
                    got = {h.id: h.payload["cluster_id"] for h in st.scroll()}
                assign = np.asarray([got[i] for i in ids])
                row = {"points": n, "method": method, "preprocess": res["preprocess"],
                       "seconds": res["seconds"], "stages": res["stages"],
                       "fit_points": res["fit_points"], "clusters": res["clusters"],
                       "noise": res["noise"],
                       "nmi_vs_components": round(float(nmi(comp, assign)), 4),
                       "store_fill_s": round(fill_s, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {"benchmark": "cluster_scale", "dim": 256, "components": 50,
              "sample_above": args.sample_above, "defaults": "ClusterConfig() defaults otherwise",
              "threads": os.environ.get("OMP_NUM_THREADS"), "hostname": platform.node(),
              "cpu_count": os.cpu_count(), "note": args.note, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
