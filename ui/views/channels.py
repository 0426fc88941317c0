"""Channels: one middle-block channel, the images that activate it most (a sparse query), and how
widely it is used across the collection (participation ratio of its stored activations)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st
from phisearch.search.explain import informative_channel
from phisearch.ui import common

ss = st.session_state
st.title("Channels")
h = common.holder()
with common.guard(), h.use() as store:
    meta = common.meta_or_stop(store)
    cat = common.catalog(store, meta)
n_ch = int(meta["sparse_dim"])
if not len(cat):
    st.info("The collection holds no points yet.")
    st.stop()

pr = cat.participation()                       # (C,)
active = (cat.mid > 0).mean(0)                 # (C,) fraction of images where it fires
mean = cat.mid.mean(0)                         # (C,)
if "channel_request" in ss:
    ss["channel_pick"] = int(ss.pop("channel_request"))
if "channel_pick" not in ss:   # not the channel every image activates: one that tells apart
    ss["channel_pick"] = informative_channel(cat.mid)

c1, c2 = st.columns([1, 3])
with c1:
    c = int(st.number_input("Channel", 0, n_ch - 1, key="channel_pick",
                            help=f"The middle block has {n_ch} channels."))
    limit = st.slider("Images", 6, 96, 24, step=6, key="channel_limit")
    st.metric("Participation ratio", f"{pr[c]:.3f}",
              help="(Σ a)² / (N Σ a²) over the collection's images: 1 when every image "
                   "activates the channel equally, about k/N when only k images do.")
    st.metric(f"Active in (of {len(cat)} images)", f"{active[c]:.1%}")
    st.metric("Mean activation", f"{mean[c]:.4f}")
with c2:
    order = np.argsort(-pr)
    rank = int(np.flatnonzero(order == c)[0]) + 1
    st.caption(f"Participation ratio of every channel, highest first; channel {c} ranks "
               f"{rank} of {n_ch}.")
    dead = int((active == 0).sum())
    st.caption(f"Dead channels: {dead} of {n_ch}. A dead channel is 0 for every indexed image "
               "(the middle block's last ReLU never lets it through), so it carries no "
               "information and is left out of the sparse vectors.")
    st.bar_chart(pd.DataFrame({"participation ratio": pr[order]},
                              index=pd.RangeIndex(1, n_ch + 1, name="rank")), height=220)

with common.guard(), h.use() as store:
    top = store.search_sparse([c], [1.0], limit=limit)
st.subheader(f"The images that activate channel {c} most")
if not top:
    st.info(f"Channel {c} is not active in any indexed image.")
    st.stop()
labels = pd.Series([common.label_text(x.payload) for x in top]).value_counts()
st.caption("Labels among them: " + ", ".join(f"{name} {n}" for name, n in labels.items()))
common.thumb_grid([(x.payload, f"a = {x.dot:.4f} · {common.label_text(x.payload)}")
                   for x in top], cols=8, key="chan")
