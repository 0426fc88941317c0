"""Clusters: the summary `idx cluster` stored, each cluster's exemplars, members and the noise."""

from __future__ import annotations

import html
import itertools
import time

import pandas as pd
import streamlit as st
from phisearch.ui import common

ss = st.session_state
MAX_ROWS = 300   # exemplar rows in the gallery (largest clusters first)


def clustering_words(doc: dict, n_clusters: int) -> str:
    """One sentence: how many points are in clusters and how many are noise, of how many."""
    noise = int(doc.get("noise", 0))
    points = int(doc.get("points") or noise + sum(c["size"] for c in doc["clusters"]))
    clustered = points - noise
    pct = (lambda n: f"{100 * n / points:.0f}%") if points else (lambda n: "-")
    space = doc.get("preprocess", "?") + (f" → {doc['projection']}"
                                          if doc.get("projection") not in (None, "none") else "")
    return (f"{points:,} points: {clustered:,} ({pct(clustered)}) in {n_clusters} clusters, "
            f"{noise:,} ({pct(noise)}) noise; {doc.get('method', '?')} in the space {space}.")


def stale_words(doc: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M", time.localtime(doc.get("stale_since") or 0))
    return (f"The clustering is stale: a build since {since} wrote or removed "
            f"{doc.get('changed_points', '?')} points ({doc.get('unclustered', '?')} now have no "
            "cluster). Run `idx cluster` again.")


def key_line(key: object) -> None:
    """A key on one line, cut with an ellipsis (full key on hover), never broken mid-key."""
    k = html.escape(str(key))
    st.markdown(f'<div title="{k}" style="white-space:nowrap;overflow:hidden;'
                f'text-overflow:ellipsis;font-size:0.8em">{k}</div>', unsafe_allow_html=True)


def member_gallery(members: list, cols: int = 6) -> None:
    """Thumbnail, key (one line) and label · strength under it."""
    for row in range(0, len(members), cols):
        for col, x in zip(st.columns(cols), members[row:row + cols]):
            with col:
                data = common.thumb_bytes(x.payload)
                if data:
                    st.image(data, width=96)
                key_line(x.payload.get("key"))
                st.caption(f"{common.label_text(x.payload)} · "
                           f"p = {x.payload.get('cluster_prob', 0):.2f}")


def open_cluster(cid: int) -> None:
    ss["cluster_open"] = cid
    ss["cluster_scroll"] = True


def reconstruct_centre(cid: int) -> None:
    ss["recon_request"] = {"src": "Cluster centre", "cluster": cid}
    ss["goto_reconstruct"] = True


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
if doc.get("stale"):
    st.warning(stale_words(doc))
if ss.pop("goto_reconstruct", False):
    st.switch_page("views/reconstruct.py")

by_id = {int(c["id"]): c for c in clusters}
made = doc.get("created_at")
noise = int(doc.get("noise", 0))
m1, m2, m3, m4 = st.columns(4)
m1.metric("Clusters", len(clusters))
m2.metric("Clustered points", sum(int(c["size"]) for c in clusters))
m3.metric("Noise points", noise)
m4.metric("Method", doc.get("method", "?"), help=f"in the space {doc.get('preprocess', '?')}"
          f"{' → ' + doc['projection'] if doc.get('projection') else ''}")
st.caption(clustering_words(doc, len(clusters)) + (
    f" Clustered {time.strftime('%Y-%m-%d %H:%M', time.localtime(made))}." if made else ""))

table = pd.DataFrame([{
    "cluster": int(c["id"]), "size": int(c["size"]),
    "top labels": ", ".join(f"{name} ({n})" for name, n in c.get("top_labels", [])),
    "channels": ", ".join(map(str, c.get("channels", []))),
    "exemplars": ", ".join(str(x) for x in c.get("exemplars", [])),
} for c in clusters])
st.dataframe(table, hide_index=True, width="stretch", height=min(400, 38 + 35 * len(table)))

# ----------------------------------------------------------------------------- exemplars
st.subheader("Exemplars")
shown = clusters[:MAX_ROWS]
if len(clusters) > MAX_ROWS:
    st.caption(f"The {MAX_ROWS} largest of {len(clusters)} clusters; pick any in Members below.")
with common.guard(), h.use() as store:
    ex_hits = {x.id: x for x in store.retrieve(
        [i for c in shown for i in c.get("exemplar_ids", [])], with_vectors=False)}
with st.container(height=560 if len(shown) > 4 else "content", key="exemplar_gallery"):
    for c in shown:
        cid = int(c["id"])
        cols = st.columns([2, 5, 1, 2])
        with cols[0]:
            st.markdown(f"**cluster {cid}** · {c['size']} images")
            if c.get("top_labels"):
                st.caption(", ".join(f"{name} {n}" for name, n in c["top_labels"]))
        with cols[1]:
            thumbs = [common.thumb_bytes(ex_hits[i].payload) for i in c.get("exemplar_ids", [])
                      if i in ex_hits]
            if any(thumbs):
                st.image([t for t in thumbs if t], width=72)
        cols[2].button("Open", key=f"open_{cid}", on_click=open_cluster, args=(cid,))
        cols[3].button("Reconstruct centre", key=f"rc_{cid}", on_click=reconstruct_centre,
                       args=(cid,), disabled=c.get("centroid_mid") is None)

# ----------------------------------------------------------------------------- members
st.subheader("Members", anchor="members")
if ss.pop("cluster_scroll", False):   # "Open" was clicked: bring the members into view
    st.html("<script>setTimeout(() => document.getElementById('members')"
            "?.scrollIntoView({behavior: 'smooth'}), 300)</script>",
            unsafe_allow_javascript=True)
choices = sorted(by_id) + ([-1] if noise else [])
if ss.get("cluster_open") not in choices:
    ss["cluster_open"] = choices[0]
c1, c2 = st.columns([2, 1])
cid = c1.selectbox("Cluster", choices, key="cluster_open",
                   format_func=lambda x: f"noise ({noise} points)" if x == -1 else
                   f"cluster {x} ({by_id[x]['size']} images)")
limit = c2.slider("Show at most", 6, 600, 60, step=6, key="cluster_limit")
with common.guard(), h.use() as store:
    total = store.count({"cluster_id": cid})
    members = list(itertools.islice(store.scroll({"cluster_id": cid}, batch=min(limit, 512)),
                                    limit))
what = "noise points (no cluster)" if cid == -1 else f"members of cluster {cid}"
st.caption(f"{total} {what}; showing {len(members)}.")
with st.container(height=640 if len(members) > 18 else "content", key="member_gallery"):
    member_gallery(members)
