"""The Reconstruct page's target: an uploaded image (σ-matched mode), a search hit, a cluster
centre or a point's middle-block means edited by hand (fixed-target mode), with what the page
shows beside it (the image it came from, a cluster's exemplars, the class it belongs to)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import streamlit as st
from phisearch.indexer.store.holder import StoreHolder
from phisearch.search import query as q
from phisearch.search import reconstruct as rc
from phisearch.search.recon_report import label_of
from phisearch.ui import common

SOURCES = ("Uploaded image", "Search hit", "Cluster centre", "Edited vector")
ss = st.session_state


@dataclass
class Choice:
    what: str                                # a caption: "hit n01440764/123", "centre of ..."
    images: np.ndarray | None = None         # (1, 64, 64, 3) uint8: σ-matched mode
    mid: np.ndarray | None = None            # (C,) middle-block means: fixed-target mode
    shown: np.ndarray | None = None          # the image the target came from
    label: str | None = None                 # the target's class, when it has one
    exemplars: list[dict] = field(default_factory=list)   # payloads (cluster centres)


def _stored(h: StoreHolder, point_id: str, n_ch: int) -> tuple[np.ndarray, dict]:
    with common.guard(), h.use() as store:
        found = store.retrieve([point_id], with_vectors=True)
    if not found:
        st.warning("That point is no longer in the collection.")
        st.stop()
    return q.target_from_hit(found[0], n_ch).mid, found[0].payload


def _payloads(h: StoreHolder, ids: list[str]) -> list[dict]:
    if not ids:
        return []
    with common.guard(), h.use() as store:
        return [x.payload for x in store.retrieve(ids, with_vectors=False)]


def hit_name(x) -> str:
    return f"{x.payload.get('key')} · {common.label_text(x.payload)} · d = {x.distance:.3f}"


def _upload(h: StoreHolder) -> Choice:
    query = ss.get("query")
    options = (["the Search query"] if query is not None and query["image"] is not None
               else []) + ["a new upload"]
    use = st.radio("Image", options, horizontal=True, key="recon_img_src",
                   persist_state="session")
    if use == "the Search query":
        label = None
        if query.get("id"):
            label = label_of(next(iter(_payloads(h, [query["id"]])), {}))
        return Choice(query["name"], images=query["image"][None], shown=query["image"],
                      label=label)
    f = st.file_uploader("An image file", key="recon_upload")
    if f is None:
        st.info("Upload an image to reconstruct from.")
        st.stop()
    up = common.read_upload(f.name, f.getvalue())
    if up.error:
        st.error(up.error)
        st.stop()
    return Choice(f"upload: {f.name}", images=up.image[None], shown=up.image)


def _hit(h: StoreHolder, n_ch: int) -> Choice:
    hits = ss.get("hits") or []
    if not hits:
        common.page_hint("Search first: its hits can be reconstructed here.", "views/search.py",
                         "Go to Search")
        st.stop()
    by_id = {x.id: x for x in hits}
    pid = st.selectbox("Hit", list(by_id), key="recon_hit",
                       format_func=lambda i: hit_name(by_id[i]))
    mid, payload = _stored(h, pid, n_ch)
    return Choice(f"hit {payload.get('key')}", mid=mid, shown=rc.thumb_image(payload),
                  label=label_of(payload))


def _cluster(h: StoreHolder, doc: dict | None) -> Choice:
    clusters = (doc or {}).get("clusters") or []
    if not clusters:
        st.info("No clustering yet: run `idx cluster`, then come back.")
        st.stop()
    by_id = {int(c["id"]): c for c in clusters}
    if ss.get("recon_cluster") not in by_id:
        ss["recon_cluster"] = next(iter(by_id))
    cid = st.selectbox("Cluster", list(by_id), key="recon_cluster", persist_state="session",
                       format_func=lambda i: f"cluster {i} ({by_id[i]['size']} images)")
    with common.guard():
        mid = rc.cluster_centroid(doc, cid)
    c = by_id[cid]
    top = c.get("top_labels") or []
    label = str(top[0][0]) if top and top[0][1] * 2 > c["size"] else None   # a majority class
    return Choice(f"centre of cluster {cid}", mid=mid, label=label,
                  exemplars=_payloads(h, list(c.get("exemplar_ids") or [])))


def _edited(h: StoreHolder, n_ch: int) -> Choice:
    query, hits = ss.get("query"), ss.get("hits") or []
    bases = {}
    if query is not None:
        bases["query"] = f"the Search query ({query['name']})"
    bases.update({x.id: hit_name(x) for x in hits})
    if not bases:
        common.page_hint("Search first: the query or a hit is the starting vector.",
                         "views/search.py", "Go to Search")
        st.stop()
    base = st.selectbox("Start from", list(bases), key="recon_base",
                        format_func=lambda b: bases[b])
    if base == "query":
        mid, shown = np.asarray(query["mid"], np.float32), query["image"]
    else:
        mid, payload = _stored(h, base, n_ch)
        shown = rc.thumb_image(payload)
    n_edit = st.slider("Channels to edit (its strongest)", 2, 16, 6, key="recon_n_edit")
    strongest = [int(c) for c in np.argsort(-mid)[:n_edit] if mid[c] > 0]
    st.caption("Scale each channel's mean (0 zeroes it). Base values in brackets.")
    target = mid.copy()
    cols = st.columns(3)
    for j, c in enumerate(strongest):
        with cols[j % 3]:
            scale = st.slider(f"channel {c} ({mid[c]:.3f})", 0.0, 3.0, 1.0, step=0.1,
                              key=f"scale_{base}_{c}")
        target[c] = mid[c] * scale
    changed = [c for c in strongest if target[c] != mid[c]]
    what = f"{bases[base]}, edited channels {changed}" if changed else bases[base]
    return Choice(what, mid=target, shown=shown)


def choose(h: StoreHolder, meta: dict, doc: dict | None) -> Choice:
    """The target widgets; stops the page with a hint when the chosen source has nothing."""
    req = ss.pop("recon_request", None)      # "Reconstruct its centre" on the Clusters page
    if req:
        ss["recon_src"] = req["src"]
        if "cluster" in req:
            ss["recon_cluster"] = req["cluster"]
    src = st.radio("Target", SOURCES, horizontal=True, key="recon_src", persist_state="session")
    n_ch = int(meta["sparse_dim"])
    if src == "Uploaded image":
        return _upload(h)
    if src == "Search hit":
        return _hit(h, n_ch)
    if src == "Cluster centre":
        return _cluster(h, doc)
    return _edited(h, n_ch)
