"""Search: an uploaded image, an indexed key, a random indexed image or a hit ("More like this")
-> its nearest images by the collection's distance. The query mode, k and the filters persist
across pages (persist_state="session"); removing the uploaded file clears its query and hits."""

from __future__ import annotations

import numpy as np
import streamlit as st
from phisearch.search import query as q
from phisearch.search.explain import is_identical
from phisearch.search.reconstruct import thumb_image
from phisearch.ui import common

ss = st.session_state
if ss.pop("goto_explain", False):
    st.switch_page("views/explain.py")

ANY = "any"        # the filters' "no filter" choice (a None option shows "Choose an option")
THUMB = 144        # px: the stored 64 px thumbnails, enlarged
COLS = 4          # wide enough for a whole key on one line beside a 144 px thumbnail
SOURCES = ["Upload an image", "Indexed key", "Random indexed image"]

st.title("Search")
h = common.holder()
with common.guard(), h.use() as store:
    meta = common.meta_or_stop(store)
    cat = common.catalog(store, meta)
if not len(cat):
    st.info("The collection holds no points yet.")
    st.stop()
SPARSE_DIM = int(meta["sparse_dim"])


# ----------------------------------------------------------------------------- the query


def set_query(name: str, image: np.ndarray | None, target: q.Target) -> None:
    ss["query"] = {"name": name, "image": image, "vector": target.vector, "mid": target.mid,
                   "id": target.id, "key": target.key}
    ss.pop("hits", None)


def clear_query() -> None:
    """The uploaded file changed or was removed: its old query and hits go with it."""
    ss.pop("query", None)
    ss.pop("hits", None)
    ss.pop("upload_seen", None)


def query_from_point(point_id: str) -> None:
    """An indexed point (a random pick, a key, a hit's "More like this") becomes the query."""
    with common.guard(), h.use() as store:
        found = store.retrieve([point_id], with_vectors=True)
    if not found:
        st.warning("That point has just been removed from the collection; pick another.")
        st.stop()
    p = found[0].payload
    set_query(f"indexed: {p.get('key')}", thumb_image(p), q.target_from_hit(found[0], SPARSE_DIM))


def from_upload() -> None:
    f = st.file_uploader("An image file (JPEG, PNG, WebP, GIF, BMP, TIFF)", key="search_upload",
                         on_change=clear_query)
    if f is None or ss.get("upload_seen") == f.file_id:
        return
    up = common.read_upload(f.name, f.getvalue())
    if up.error:
        st.error(up.error)
        st.stop()
    for note in up.notes:
        st.caption(note)
    with st.spinner("Computing φ..."):
        target = q.target_from_image(f.getvalue(), common.embedder(meta))
    set_query(f"upload: {f.name}", up.image, target)
    ss["upload_seen"] = f.file_id


def from_key() -> None:
    st.text_input("Indexed key", key="search_key", persist_state="session",
                  placeholder="e.g. n01440764_10043", on_change=lambda: ss.update(want_key=True),
                  help="The `key` of an indexed image, as shown under every hit.")
    key = (ss.get("search_key") or "").strip()
    if not (ss.pop("want_key", False) and key):
        return
    with common.guard(), h.use() as store:
        try:
            target = q.target_from_key(store, key, SPARSE_DIM)
        except q.NotFound as e:
            st.error(f"{e}: type a key exactly as a hit shows it.")
            st.stop()
    query_from_point(target.id)


def from_random() -> None:
    if st.button("Pick a random indexed image", key="random"):
        query_from_point(cat.ids[int(np.random.default_rng().integers(len(cat)))])


if more := ss.pop("more_like", None):
    query_from_point(more)
src = st.radio("Query", SOURCES, horizontal=True, key="search_src", persist_state="session")
{SOURCES[0]: from_upload, SOURCES[1]: from_key, SOURCES[2]: from_random}[src]()

query = ss.get("query")
if query is None:
    st.info("Upload an image, type an indexed key or pick a random indexed image.")
    st.stop()


# ----------------------------------------------------------------------------- filters


def label_words(x: int | str) -> str:
    if x == ANY:
        return "any label"
    name = cat.label_names.get(int(x))
    return f"label {x} ({name})" if name else f"label {x}"


def cluster_words(x: int | str) -> str:
    return "any cluster" if x == ANY else ("noise" if x == -1 else f"cluster {x}")


label_ids = sorted(int(x) for x in np.unique(cat.labels) if x >= 0)
cluster_ids = sorted(int(x) for x in np.unique(cat.clusters) if x >= -1)
c1, c2, c3, c4 = st.columns([1, 2, 2, 1])
with c1:
    if query["image"] is not None:
        st.image(common.png_bytes(query["image"], 2), caption=query["name"])
    else:
        st.caption(query["name"])
with c2:
    k = st.slider("Hits (k)", 1, 60, 12, key="search_k", persist_state="session")
    label = st.selectbox("Label", [ANY] + label_ids, key="search_label", format_func=label_words,
                         persist_state="session")
with c3:
    cluster = st.selectbox("Cluster", [ANY] + cluster_ids, key="search_cluster",
                           format_func=cluster_words, persist_state="session",
                           help=None if cluster_ids else "No clusters yet: run idx cluster.")
flt = {f: v for f, v in (("label", label), ("cluster_id", cluster)) if v != ANY}
words = ", ".join(w for w, v in ((label_words(label), label), (cluster_words(cluster), cluster))
                  if v != ANY)
with common.guard(), h.use() as store:
    hits = q.search(store, q.Target(query["vector"], query["mid"]), k, flt or None)
    why = None if hits else q.why_no_match(store, flt)
if not hits:
    st.warning(f"No image matches {words}: {why}." if why else f"No image matches {words}.")
    st.stop()
far = float(np.ceil(max(x.distance for x in hits) * 1000) / 1000) or 0.001
with c3:
    # step 0.001, like `far`: a value off the step grid makes the browser send it back (rerun)
    max_d = st.slider("Max distance", 0.0, far, far, step=0.001, format="%.3f")
with c4:
    st.metric("Indexed images", len(cat))
near = [x for x in hits if x.distance <= max_d]
ss["hits"] = near
if not near:
    st.info(f"No hit within distance {max_d:.3f}: the nearest of the {len(hits)} is at "
            f"{hits[0].distance:.3f}. Raise Max distance to see it.")
    st.stop()

# ----------------------------------------------------------------------------- results


def open_explain(i: int) -> None:
    ss["explain_id"] = near[i].id
    ss["goto_explain"] = True


def more_like(i: int) -> None:
    ss["more_like"] = near[i].id


def hit_caption(x) -> str:
    """Distance (the query's own image said as such), label, cluster."""
    d = f"d = {x.distance:.3f}"
    if x.id == query["id"] or is_identical(x.distance):
        d += " (the query image)" if x.id == query["id"] else " (identical to the query)"
    return f"{d} · {common.label_text(x.payload)} · {common.cluster_text(x.payload)}"


def hit_grid() -> None:
    for row in range(0, len(near), COLS):
        for i, (col, x) in enumerate(zip(st.columns(COLS), near[row:row + COLS]), row):
            with col:
                img = thumb_image(x.payload)
                if img is not None:
                    st.image(common.png_bytes(img, 2), width=THUMB)
                st.caption(hit_caption(x))
                st.caption(f"`{x.payload.get('key')}`")
                st.button("Explain", key=f"hit_{i}", on_click=open_explain, args=(i,))
                st.button("More like this", key=f"more_{i}", on_click=more_like, args=(i,))


st.subheader(f"{len(near)} nearest" + (f" with {words}" if words else "")
             + (f" within distance {max_d:.3f}" if len(near) < len(hits) else ""))
hit_grid()
