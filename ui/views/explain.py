"""Explain: why a hit is near its query. First the distance the search used, taken apart over the
dimensions of the collection's readout; then, as a second view labelled as such, the paper's
middle-block channels (another space: its distance is not the search's)."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from phisearch.indexer.model.readout import parse_label
from phisearch.search import query as q
from phisearch.search.explain import (
    COMMON,
    axis_names,
    common_channels,
    explain_readout,
    is_identical,
    readout_words,
)
from phisearch.search.reconstruct import thumb_image
from phisearch.ui import common

ss = st.session_state
DRIVER_ROWS = 4      # driver channels shown with their top-activating images
DRIVER_THUMBS = 6

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
top = st.slider("Dimensions and channels listed", 3, 32, 10, key="explain_top")

h = common.holder()
with common.guard(), h.use() as store:
    meta = common.meta_or_stop(store)
    full = store.retrieve([choice], with_vectors=True)
    cat = common.catalog(store, meta)
if not full:
    st.warning("That point is no longer in the collection; search again.")
    st.stop()
hit, distance = full[0], by_id[choice].distance
readout, sparse_dim = str(meta.get("readout", "mid")), int(meta["sparse_dim"])

c1, c2, c3 = st.columns([1, 1, 3])
with c1:
    if query["image"] is not None:
        st.image(common.png_bytes(query["image"], 2), caption=f"query ({query['name']})")
with c2:
    img = thumb_image(hit.payload)
    if img is not None:
        st.image(common.png_bytes(img, 2), caption=f"hit: {hit.payload.get('key')}")
with c3:
    st.metric("Search distance (collection's readout)", f"{distance:.4f}")
    st.caption(f"Readout `{readout}`, {len(hit.vector)} dimensions.")
if is_identical(distance):
    st.success("Identical images: the search distance is 0, the query and this hit have the "
               "same φ, so nothing drives them apart.")
    st.stop()


# ----------------------------------------------------------------------------- the search's space


def bar(df: pd.DataFrame, x: str) -> None:
    st.bar_chart(df, x=x, y="share", sort="-share", horizontal=True, height=40 + 22 * len(df))


def readout_view() -> None:
    st.subheader("What the search measured")
    st.caption(readout_words(readout) + " Each dimension's share of the squared search "
               "distance, (query − hit)² / d², largest first.")
    names = axis_names(readout, len(hit.vector), sparse_dim)
    rx = explain_readout(query["vector"], hit.vector, names, top)
    df = pd.DataFrame([{"dimension": d["name"], "query": round(d["a"], 4), "hit": round(d["b"], 4),
                        "share": round(d["share"], 4)} for d in rx["drivers"]])
    left, right = st.columns(2)
    with left:
        st.dataframe(df, hide_index=True, width="stretch")
    with right:
        bar(df, "dimension")
    st.caption(f"These {len(df)} of {len(names)} dimensions carry {rx['listed_share']:.0%} of "
               f"the squared distance (recomputed here: {rx['distance']:.4f}).")


# ----------------------------------------------------------------------------- the paper's channels


def channel_thumbs(rows: list[dict]) -> None:
    """Each driver channel beside the indexed images that activate it most."""
    with common.guard(), h.use() as store:
        tops = [store.search_sparse([d["channel"]], [1.0], limit=DRIVER_THUMBS) for d in rows]
    for d, found in zip(rows, tops):
        cols = st.columns([2] + [1] * DRIVER_THUMBS)
        cols[0].caption(f"channel {d['channel']}: {d['share']:.1%} of the distance; query "
                        f"{d['a']:.3f}, hit {d['b']:.3f}. Its top images:")
        for col, x in zip(cols[1:], found):
            img = thumb_image(x.payload)
            if img is not None:
                col.image(common.png_bytes(img), width=72, caption=common.label_text(x.payload))


def channel_view() -> None:
    other = q.target_from_hit(hit, sparse_dim)
    ex = q.explain(query["mid"], other.mid, top=top, leave_out=common_channels(cat.mid))
    st.subheader("Second view: the paper's channels (middle block)")
    same = parse_label(readout) == parse_label("mid")
    st.caption("The middle block's channel means, the paper's φ. " + (
        "This collection's readout is that φ itself, so the distance is the search's." if same
        else "A different space from the search's: its distance is not the search distance "
             "and can be much smaller or larger."))
    a = ex["active"]
    st.metric("Middle-block distance (paper's φ)", f"{ex['distance']:.4f}")
    st.caption(f"Active channels: query {a['a']}, hit {a['b']}, both {a['both']} of "
               f"{sparse_dim}. Left out of the lists: {ex['left_out']} channels active in "
               f"{COMMON:.0%} or more of the images (they say little; "
               f"{ex['left_out_share']:.0%} of this distance).")
    left, right = st.columns(2)
    with left:
        st.markdown("**Channels that drive the distance**")
        drivers = pd.DataFrame([{"channel": d["channel"], "query": round(d["a"], 4),
                                 "hit": round(d["b"], 4), "share": round(d["share"], 4)}
                                for d in ex["drivers"]])
        if len(drivers):
            st.dataframe(drivers, hide_index=True, width="stretch")
        else:
            st.caption("No other channel differs between them.")
    with right:
        st.markdown("**Channels they share** (active in both, strongest first)")
        shared = pd.DataFrame([{"channel": d["channel"], "query": round(d["a"], 4),
                                "hit": round(d["b"], 4)} for d in ex["shared"]])
        if len(shared):
            st.dataframe(shared, hide_index=True, width="stretch")
        else:
            st.caption("No channel is active in both.")
    channel_thumbs(ex["drivers"][:DRIVER_ROWS])
    open_channel([d["channel"] for d in ex["drivers"]] + [d["channel"] for d in ex["shared"]])


def open_channel(channels: list[int]) -> None:
    if not channels:
        return
    pick = st.selectbox("Open a channel", list(dict.fromkeys(channels)), key="explain_channel")
    if st.button("Show the images that activate it most"):
        ss["channel_request"] = int(pick)
        st.switch_page("views/channels.py")


readout_view()
channel_view()
