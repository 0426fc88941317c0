"""Index: what `idx status` reports about the collection (pipeline.status())."""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st
from phisearch.indexer.ingest.summary import status
from phisearch.ui import common


def when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


st.title("Index")
s = common.settings()
with common.guard():
    info = common.holder(s).unheld(status)   # status() opens the store itself
if info is None:
    st.info(f"No collection in {s.where} yet: run `idx build --data ...` first.")
    st.stop()

m1, m2, m3, m4 = st.columns(4)
m1.metric("Points", info["points"])
m2.metric("Shards done", info["shards_done"])
m3.metric("Shards pending", info["shards_pending"])
m4.metric("Skipped samples", sum(info["skipped"].values()))

away = info.get("unavailable") or []
if away:
    st.warning(f"{len(away)} folder paths could not be read at the last sync (a drive that is "
               f"away, a folder that cannot be listed): their {sum(a['kept'] for a in away)} "
               "points are kept, not deleted, and synced again once the paths are readable.")
    st.dataframe(pd.DataFrame([{
        "path": a["path"], "state": a["reason"], "points kept": a["kept"],
        "since": when(a.get("since")), "why": a["detail"], "folder": a["folder"],
    } for a in away]), hide_index=True, width="stretch")

cl = info.get("clustering")
st.subheader("Clustering")
if cl is None:
    st.caption("Not clustered yet: run `idx cluster` (then the Clusters page shows the groups).")
else:
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Clusters", cl["clusters"])
    c2.metric("Clustered points", (cl.get("points") or 0) - (cl.get("noise") or 0))
    c3.metric("Noise points", cl.get("noise") or 0)
    c4.metric("Clustered", when(cl.get("created_at"))[:16],
              help=f"{cl.get('method')} in {cl.get('preprocess')} → {cl.get('projection')}")
    if cl["stale"]:
        st.warning(f"Clustering stale: a build since {when(cl.get('stale_since'))} wrote or "
                   f"removed {cl.get('changed_points')} points ({cl.get('unclustered')} have no "
                   "cluster now). Run `idx cluster` again.")

last = info.get("last_run") or {}
if last.get("running_since") and (last.get("finished_at") or 0) < last["running_since"]:
    st.warning(f"A build started {when(last['running_since'])} has not finished: it is running, "
               "or it was interrupted (rerun the same `idx build` to resume).")

st.subheader("How the collection was built")
settings_rows = {k: info.get(k) for k in ("collection", "backend", "checkpoint", "model_sha256",
                                          "readout", "dim", "sigma", "draws", "seed",
                                          "schema_version")}
st.dataframe(pd.DataFrame({"setting": list(settings_rows),
                           "value": [str(v) for v in settings_rows.values()]}),
             hide_index=True, width="stretch")
if info["skipped"]:
    st.subheader("Skipped samples by reason")
    st.dataframe(pd.DataFrame({"reason": list(info["skipped"]),
                               "count": list(info["skipped"].values())}), hide_index=True)
if info.get("shards"):
    st.subheader("Shards")
    st.dataframe(pd.DataFrame([{
        "shard": url, "indexed": r.get("indexed"),
        "skipped": sum((r.get("skipped") or {}).values()),
        "deleted": r.get("deleted", 0), "completed": when(r.get("completed_at")),
    } for url, r in info["shards"].items()]), hide_index=True, width="stretch")
if last:
    with st.expander("Last build"):
        st.json(last)
with st.expander("`idx status --json`"):
    st.json({k: v for k, v in info.items() if k != "shards"})
