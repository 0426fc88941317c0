"""Search: an uploaded or a random indexed image -> its nearest images by φ distance."""

from __future__ import annotations

import numpy as np
import streamlit as st
from phisearch.search import query as q
from phisearch.search.reconstruct import thumb_image
from phisearch.ui import common

ss = st.session_state
if ss.pop("goto_explain", False):
    st.switch_page("views/explain.py")

st.title("Search")
h = common.holder()
with common.guard(), h.use() as store:
    meta = common.meta_or_stop(store)
    cat = common.catalog(store, meta)
if not len(cat):
    st.info("The collection holds no points yet.")
    st.stop()


def set_query(name: str, image: np.ndarray | None, target: q.Target, token: str) -> None:
    ss["query"] = {"name": name, "image": image, "vector": target.vector, "mid": target.mid,
                   "id": target.id, "token": token}
    ss.pop("hits", None)


src = st.radio("Query", ["Upload an image", "Random indexed image"], horizontal=True,
               key="search_src")
if src == "Upload an image":
    f = st.file_uploader("An image file (JPEG, PNG, WebP, GIF, BMP, TIFF)", key="search_upload")
    if f is not None and (ss.get("query") or {}).get("token") != f.file_id:
        up = common.read_upload(f.name, f.getvalue())
        if up.error:
            st.error(up.error)
            st.stop()
        for note in up.notes:
            st.caption(note)
        with st.spinner("Computing φ..."):
            target = q.target_from_image(f.getvalue(), common.embedder(meta))
        set_query(f"upload: {f.name}", up.image, target, f.file_id)
else:
    if st.button("Pick a random indexed image", key="random"):
        pid = cat.ids[int(np.random.default_rng().integers(len(cat)))]
        with common.guard(), h.use() as store:
            hit = store.retrieve([pid], with_vectors=True)
        if not hit:
            st.warning("That point has just been removed; pick again.")
            st.stop()
        set_query(f"indexed: {hit[0].payload.get('key')}", thumb_image(hit[0].payload),
                  q.target_from_hit(hit[0], int(meta["sparse_dim"])), pid)

query = ss.get("query")
if query is None:
    st.info("Upload an image or pick a random indexed one.")
    st.stop()

# ----------------------------------------------------------------------------- filters
label_ids = sorted(int(x) for x in np.unique(cat.labels) if x >= 0)
cluster_ids = sorted(int(x) for x in np.unique(cat.clusters) if x >= -1)
c1, c2, c3, c4 = st.columns([1, 2, 2, 1])
with c1:
    if query["image"] is not None:
        st.image(common.png_bytes(query["image"], 2), caption=query["name"])
    else:
        st.caption(query["name"])
with c2:
    k = st.slider("Hits (k)", 1, 60, 12, key="search_k")
    label = st.selectbox("Label", [None] + label_ids, key="search_label",
                         format_func=lambda x: "any label" if x is None else
                         f"{x} · {cat.label_names.get(x, '')}")
with c3:
    cluster = st.selectbox("Cluster", [None] + cluster_ids, key="search_cluster",
                           format_func=lambda x: "any cluster" if x is None else
                           ("noise (-1)" if x == -1 else f"cluster {x}"),
                           help=None if cluster_ids else "No clusters yet: run idx cluster.")
flt = {k_: v for k_, v in (("label", label), ("cluster_id", cluster)) if v is not None}
with common.guard(), h.use() as store:
    hits = q.search(store, q.Target(query["vector"], query["mid"]), k, flt or None)
if not hits:
    st.warning("No hits with these filters.")
    st.stop()
far = float(np.ceil(max(x.distance for x in hits) * 1000) / 1000) or 0.001
with c3:
    # step 0.001, like `far`: a value off the step grid makes the browser send it back (rerun)
    max_d = st.slider("Max distance", 0.0, far, far, step=0.001, format="%.3f")
with c4:
    st.metric("Indexed images", len(cat))
hits = [x for x in hits if x.distance <= max_d]
ss["hits"] = hits

# ----------------------------------------------------------------------------- results


def open_explain(i: int) -> None:
    ss["explain_id"] = hits[i].id
    ss["goto_explain"] = True


st.subheader(f"{len(hits)} nearest" + (f" (filtered: {flt})" if flt else ""))
common.thumb_grid(
    [(x.payload, (f"d = {x.distance:.3f} · {common.label_text(x.payload)} · "
                  f"{common.cluster_text(x.payload)}")) for x in hits],
    button=("Explain", open_explain), key="hit")
