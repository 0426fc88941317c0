"""Clusters: the summary `idx cluster` stored, each cluster's exemplars, members and the noise."""

from __future__ import annotations

import itertools
import time

import pandas as pd
import streamlit as st
from phisearch.ui import common

ss = st.session_state
st.title("Clusters")
h = common.holder()
with common.guard(), h.use() as store:
    meta = common.meta_or_stop(store)
    doc = store.get_doc("clusters")
clusters = (doc or {}).get("clusters") or []
if not clusters:
    st.info(f"No clustering yet: run `idx cluster` on this store ({common.settings().where}), "
            "then reload this page.")
    st.stop()
if doc.get("model_sha256") not in (None, meta["model_sha256"]):
    st.warning("These clusters were computed with another model than the collection's: run "
               "`idx cluster` again.")

by_id = {int(c["id"]): c for c in clusters}
made = doc.get("created_at")
m1, m2, m3, m4 = st.columns(4)
m1.metric("Clusters", len(clusters))
m2.metric("Noise points", doc.get("noise", 0))
m3.metric("Points clustered", doc.get("points", sum(c["size"] for c in clusters)))
m4.metric("Method", doc.get("method", "?"), help=f"in the space {doc.get('preprocess', '?')}")
if made:
    st.caption(f"Clustered {time.strftime('%Y-%m-%d %H:%M', time.localtime(made))}.")

table = pd.DataFrame([{
    "cluster": int(c["id"]), "size": int(c["size"]),
    "top labels": ", ".join(f"{name} ({n})" for name, n in c.get("top_labels", [])),
    "channels": ", ".join(map(str, c.get("channels", []))),
    "exemplars": ", ".join(str(x) for x in c.get("exemplars", [])),
} for c in clusters])
st.dataframe(table, hide_index=True, width="stretch", height=min(400, 38 + 35 * len(table)))


def open_cluster(cid: int) -> None:
    ss["cluster_open"] = cid


def reconstruct_centre(cid: int) -> None:
    ss["recon_request"] = {"src": "Cluster centre", "cluster": cid}
    ss["goto_reconstruct"] = True


if ss.pop("goto_reconstruct", False):
    st.switch_page("views/reconstruct.py")

# ----------------------------------------------------------------------------- exemplars
st.subheader("Exemplars")
per_page = 6
pages = (len(clusters) + per_page - 1) // per_page
page = st.number_input("Page", 1, max(pages, 1), 1, key="cluster_page") if pages > 1 else 1
shown = clusters[(page - 1) * per_page: page * per_page]
with common.guard(), h.use() as store:
    ex_hits = {x.id: x for x in store.retrieve(
        [i for c in shown for i in c.get("exemplar_ids", [])], with_vectors=False)}
for c in shown:
    cid = int(c["id"])
    cols = st.columns([2, 5, 1, 2])
    with cols[0]:
        st.markdown(f"**cluster {cid}** · {c['size']} images")
        if c.get("top_labels"):
            st.caption(", ".join(f"{name} {n}" for name, n in c["top_labels"]))
        if c.get("channels"):
            st.caption("channels " + ", ".join(map(str, c["channels"][:6])))
    with cols[1]:
        thumbs = [common.thumb_bytes(ex_hits[i].payload) for i in c.get("exemplar_ids", [])
                  if i in ex_hits]
        if thumbs:
            st.image([t for t in thumbs if t], width=72)
    cols[2].button("Open", key=f"open_{cid}", on_click=open_cluster, args=(cid,))
    cols[3].button("Reconstruct centre", key=f"rc_{cid}", on_click=reconstruct_centre,
                   args=(cid,), disabled=c.get("centroid_mid") is None)

# ----------------------------------------------------------------------------- members
st.subheader("Members")
choices = sorted(by_id) + [-1]
if ss.get("cluster_open") not in choices:
    ss["cluster_open"] = choices[0]
c1, c2 = st.columns([2, 1])
cid = c1.selectbox("Cluster", choices, key="cluster_open",
                   format_func=lambda x: "noise (-1)" if x == -1 else
                   f"cluster {x} ({by_id[x]['size']} images)")
limit = c2.slider("Show at most", 6, 300, 36, step=6, key="cluster_limit")
with common.guard(), h.use() as store:
    total = store.count({"cluster_id": cid})
    members = list(itertools.islice(store.scroll({"cluster_id": cid}, batch=min(limit, 512)),
                                    limit))
what = "noise points (no cluster)" if cid == -1 else f"members of cluster {cid}"
st.caption(f"{total} {what}; showing {len(members)}.")
common.thumb_grid([(x.payload, (f"{x.payload.get('key')} · {common.label_text(x.payload)} · "
                                f"p = {x.payload.get('cluster_prob', 0):.2f}"))
                   for x in members], cols=8, key="member")
