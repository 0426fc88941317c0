"""Explain: which middle-block channels a query and a hit share, and which drive their distance."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from phisearch.search import query as q
from phisearch.search.reconstruct import thumb_image
from phisearch.ui import common

ss = st.session_state
st.title("Explain a match")
query, hits = ss.get("query"), ss.get("hits") or []
if query is None or not hits:
    common.page_hint("Search first: the query and its hits are explained here.",
                     "views/search.py", "Go to Search")
    st.stop()

ids = [x.id for x in hits]
by_id = {x.id: x for x in hits}
default = ids.index(ss["explain_id"]) if ss.get("explain_id") in by_id else 0
choice = st.selectbox(
    "Hit", ids, index=default, key="explain_pick",
    format_func=lambda i: f"{by_id[i].payload.get('key')} · {common.label_text(by_id[i].payload)}"
                          f" · d = {by_id[i].distance:.3f}")
ss["explain_id"] = choice
top = st.slider("Channels listed", 3, 32, 10, key="explain_top")

h = common.holder()
with common.guard(), h.use() as store:
    meta = common.meta_or_stop(store)
    full = store.retrieve([choice], with_vectors=True)
if not full:
    st.warning("That point is no longer in the collection; search again.")
    st.stop()
other = q.target_from_hit(full[0], int(meta["sparse_dim"]))
ex = q.explain(query["mid"], other.mid, top=top)

c1, c2, c3 = st.columns([1, 1, 3])
with c1:
    if query["image"] is not None:
        st.image(common.png_bytes(query["image"], 2), caption=f"query ({query['name']})")
with c2:
    img = thumb_image(full[0].payload)
    if img is not None:
        st.image(common.png_bytes(img, 2), caption=f"hit: {full[0].payload.get('key')}")
with c3:
    st.metric("Search distance (collection's readout)", f"{by_id[choice].distance:.4f}")
    st.metric("Middle-block distance", f"{ex['distance']:.4f}",
              help="Euclidean distance between the two middle-block channel-mean vectors, "
                   "the space the channels below live in.")
    a = ex["active"]
    st.caption(f"Active channels: query {a['a']}, hit {a['b']}, both {a['both']} "
               f"of {meta['sparse_dim']}.")

left, right = st.columns(2)
with left:
    st.subheader("Channels that drive the distance")
    st.caption("Share of the squared middle-block distance, (a_c - b_c)² / ||a - b||².")
    drivers = pd.DataFrame([{"channel": d["channel"], "query": round(d["a"], 4),
                             "hit": round(d["b"], 4), "share": round(d["share"], 4)}
                            for d in ex["drivers"]])
    st.dataframe(drivers, hide_index=True, width="stretch")
    if len(drivers):
        chart = drivers.assign(channel=[f"c{c}" for c in drivers["channel"]])
        st.bar_chart(chart, x="channel", y="share", sort="-share", horizontal=True,
                     height=40 + 22 * len(chart))
with right:
    st.subheader("Channels they share")
    st.caption("Active in both, strongest shared activation first.")
    shared = pd.DataFrame([{"channel": d["channel"], "query": round(d["a"], 4),
                            "hit": round(d["b"], 4)} for d in ex["shared"]])
    if len(shared):
        st.dataframe(shared, hide_index=True, width="stretch")
    else:
        st.caption("No channel is active in both.")

channels = [d["channel"] for d in ex["drivers"]] + [d["channel"] for d in ex["shared"]]
if channels:
    pick = st.selectbox("Open a channel", list(dict.fromkeys(channels)), key="explain_channel")
    if st.button("Show the images that activate it most"):
        ss["channel_request"] = int(pick)
        st.switch_page("views/channels.py")
