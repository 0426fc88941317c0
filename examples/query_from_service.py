"""Query a phisearch collection from another service with qdrant-client alone (no phisearch).

It relies only on the contract in docs/collection-schema.md: the dense vector `phi` (Euclid),
the sparse vector `phi_sparse` (middle-block channels), the payload keys and the metadata in the
companion collection `<collection>__phisearch_meta`.

    export QDRANT_URL=http://localhost:6333 QDRANT_API_KEY=...
    python examples/query_from_service.py --collection phisearch -k 5
    python examples/query_from_service.py --id <point uuid> --label 3 --cluster 0 --json

Three queries, all from a stored point (its vectors are used; no model needed):
  1. kNN by point id on `phi` (Qdrant looks the vector up itself),
  2. a channel query on `phi_sparse`: images where the point's strongest channels fire,
  3. kNN restricted by a payload filter on `label` and `cluster_id` (both indexed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid

from qdrant_client import QdrantClient, models

SCHEMA_VERSION = 1
NS = uuid.uuid5(uuid.NAMESPACE_URL, "phisearch")
SHOWN = ["key", "label", "label_name", "cluster_id", "dataset"]   # payload keys printed


def read_meta(client: QdrantClient, collection: str) -> dict:
    """The collection's metadata record (model, readout, φ settings, dim, schema_version)."""
    recs = client.retrieve(f"{collection}__phisearch_meta", [str(uuid.uuid5(NS, "meta"))],
                           with_payload=True)
    if not recs:
        raise SystemExit(f"{collection}: no phisearch metadata (not built by idx build?)")
    return json.loads(recs[0].payload["json"])


def rows(points: list) -> list[dict]:
    return [{"id": str(p.id), "score": round(float(p.score), 6),
             **{k: (p.payload or {}).get(k) for k in SHOWN}} for p in points]


def run(client: QdrantClient, collection: str, point_id: str | None, k: int,
        label: int | None, cluster: int | None, channels: int) -> dict:
    meta = read_meta(client, collection)
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise SystemExit(f"schema_version {meta.get('schema_version')} is not the "
                         f"{SCHEMA_VERSION} this example knows")
    if point_id is None:   # any stored point will do for a demonstration
        found, _ = client.scroll(collection, limit=1, with_payload=False)
        if not found:
            raise SystemExit(f"{collection} is empty")
        point_id = str(found[0].id)
    src = client.retrieve(collection, [point_id], with_payload=True,
                          with_vectors=["phi_sparse"])
    if not src:
        raise SystemExit(f"no point {point_id} in {collection}")
    payload, sparse = src[0].payload, src[0].vector["phi_sparse"]

    # 1. kNN by id: Qdrant uses the stored `phi` of that point; scores are Euclidean distances.
    knn = client.query_points(collection, query=point_id, using="phi", limit=k,
                              with_payload=SHOWN).points

    # 2. channel query: the point's strongest middle-block channels, weight 1 each; the score is
    #    the sum of those channels' activations in each image (dot product).
    top = sorted(zip(sparse.values, sparse.indices), reverse=True)[:channels]
    chans = sorted(int(i) for _, i in top)
    by_channel = client.query_points(
        collection, query=models.SparseVector(indices=chans, values=[1.0] * len(chans)),
        using="phi_sparse", limit=k, with_payload=SHOWN).points

    # 3. the same kNN, only among points with this label and cluster (payload indexes).
    label = payload.get("label") if label is None else label
    cluster = payload.get("cluster_id") if cluster is None else cluster
    must = [models.FieldCondition(key=key, match=models.MatchValue(value=v))
            for key, v in (("label", label), ("cluster_id", cluster)) if v is not None]
    filtered = client.query_points(collection, query=point_id, using="phi", limit=k,
                                   query_filter=models.Filter(must=must),
                                   with_payload=SHOWN).points
    return {"collection": collection, "meta": {k_: meta.get(k_) for k_ in (
                "model_sha256", "readout", "sigma", "draws", "seed", "dim", "schema_version")},
            "query": {"id": point_id, "key": payload.get("key"), "label": payload.get("label"),
                      "cluster_id": payload.get("cluster_id")},
            "knn": rows(knn), "channels": chans, "by_channel": rows(by_channel),
            "filter": {"label": label, "cluster_id": cluster}, "filtered": rows(filtered)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=os.environ.get("QDRANT_URL", "http://localhost:6333"),
                    help="Qdrant server URL (env QDRANT_URL)")
    ap.add_argument("--api-key", default=os.environ.get("QDRANT_API_KEY"),
                    help="API key (env QDRANT_API_KEY; prefer the environment)")
    ap.add_argument("--collection", default="phisearch")
    ap.add_argument("--id", dest="point_id", help="query point id (default: any stored point)")
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--label", type=int, help="filter label (default: the query point's)")
    ap.add_argument("--cluster", type=int, help="filter cluster_id (default: the point's)")
    ap.add_argument("--channels", type=int, default=3, help="strongest channels to query")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    client = QdrantClient(url=a.url, api_key=a.api_key)
    out = run(client, a.collection, a.point_id, a.k, a.label, a.cluster, a.channels)
    if a.json:
        print(json.dumps(out))
        return
    q = out["query"]
    print(f"{out['collection']}: model {out['meta']['model_sha256'][:12]}, readout "
          f"{out['meta']['readout']}, dim {out['meta']['dim']}")
    print(f"query point {q['id']} key={q['key']} label={q['label']} cluster={q['cluster_id']}")
    for title, hits in (("kNN on phi (Euclidean distance)", out["knn"]),
                        (f"channels {out['channels']} on phi_sparse (sum of activations)",
                         out["by_channel"]),
                        (f"kNN with filter {out['filter']}", out["filtered"])):
        print(f"\n{title}:")
        for h in hits:
            print(f"  {h['score']:10.4f}  {h['key']}  label={h['label']} ({h['label_name']})"
                  f"  cluster={h['cluster_id']}")


if __name__ == "__main__":
    sys.exit(main())
