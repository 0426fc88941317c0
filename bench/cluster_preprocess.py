"""Which preprocessing should `idx cluster` use? NMI against the labels and noise fraction of
HDBSCAN and k-means on a built collection's stored φ, for raw / l2 / pca(d) vectors.

NMI counts HDBSCAN's noise as one more group (so a clusterer that calls most points noise is
penalized); `nmi_clustered` is the NMI over the non-noise points only.

    idx build --data 'imagenette-test-{000000..000001}.tar' --store /tmp/s --checkpoint C
    python bench/cluster_preprocess.py --store /tmp/s --out bench/results/cluster_preprocess.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from phisearch.indexer.manage.cluster import ClusterConfig, Preprocessor, fit_assign, read_vectors
from phisearch.indexer.store import StoreConfig, open_store
from sklearn.metrics import normalized_mutual_info_score as nmi

PREPROCESS = (("raw", 0), ("l2", 0), ("pca", 16), ("pca", 32), ("pca", 64))
HDBSCAN = (("eom", 15, None), ("eom", 10, 1), ("leaf", 10, 5), ("leaf", 10, 1), ("leaf", 5, 1))


def score(labels: np.ndarray, assign: np.ndarray) -> dict:
    ok = assign >= 0
    return {"clusters": int(assign.max() + 1) if ok.any() else 0,
            "noise_frac": round(float(1 - ok.mean()), 4),
            "nmi": round(float(nmi(labels, assign)), 4),
            "nmi_clustered": round(float(nmi(labels[ok], assign[ok])), 4) if ok.sum() > 1 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--collection", default="phisearch")
    ap.add_argument("--ks", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--note", default="")
    ap.add_argument("--out", type=Path, default=Path("bench/results/cluster_preprocess.json"))
    args = ap.parse_args()
    with open_store(StoreConfig(path=args.store, collection=args.collection)) as st:
        meta = st.meta()
        v = read_vectors(st, meta.get("sparse_dim"))
    keep = np.asarray([lab is not None for lab in v.labels])
    labels = np.asarray([lab for lab in v.labels if lab is not None])
    x = v.dense[keep]
    rows = []
    runs = [ClusterConfig(method="hdbscan", selection=sel, min_cluster_size=m, min_samples=ms)
            for sel, m, ms in HDBSCAN] + [ClusterConfig(method="kmeans", k=k) for k in args.ks]
    for how, dims in PREPROCESS:
        z = Preprocessor.fit(x, how, dims or 1)(x)
        name = f"pca{dims}" if how == "pca" else how
        for cfg in runs:
            t0 = time.perf_counter()
            assign, _, _ = fit_assign(z, cfg)
            param = (f"{cfg.selection} min_cluster_size={cfg.min_cluster_size} "
                     f"min_samples={cfg.min_samples}" if cfg.method == "hdbscan" else f"k={cfg.k}")
            row = {"preprocess": name, "method": cfg.method, "param": param,
                   **score(labels, assign), "seconds": round(time.perf_counter() - t0, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"benchmark": "cluster_preprocess", "points": len(x),
              "classes": len(set(labels.tolist())), "dim": int(x.shape[1]),
              "collection": {k: meta.get(k) for k in ("checkpoint", "model_sha256", "readout",
                                                      "sigma", "draws", "seed")},
              "hostname": platform.node(), "note": args.note, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
