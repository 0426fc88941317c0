"""Reconstruct: draw images whose φ matches a target (search/reconstruct.py, SPEC §4), from an
uploaded image, a search hit, a cluster centre or a point's middle-block means edited by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st
from phisearch.search import query as q
from phisearch.search import reconstruct as rc
from phisearch.ui import common

SOURCES = ("Uploaded image", "Search hit", "Cluster centre", "Edited vector")
ss = st.session_state
st.title("Reconstruct")
st.caption("Guided sampling: the samples are drawn so that their φ matches the target's. What "
           "they have in common is what φ encodes; what varies, it leaves out.")

h = common.holder()
with common.guard(), h.use() as store:
    meta = common.meta_or_stop(store)
    doc = store.get_doc("clusters")
n_ch = int(meta["sparse_dim"])
req = ss.pop("recon_request", None)
if req:
    ss["recon_src"] = req["src"]
    if "cluster" in req:
        ss["recon_cluster"] = req["cluster"]

query, hits = ss.get("query"), ss.get("hits") or []
src = st.radio("Target", SOURCES, horizontal=True, key="recon_src")
target_images: np.ndarray | None = None   # (1, 64, 64, 3) uint8: σ-matched mode
target: np.ndarray | None = None          # (C,) middle-block means: fixed-target mode
shown: np.ndarray | None = None           # the image the target came from, shown first
what = ""


def stored_mid(point_id: str) -> tuple[np.ndarray, dict]:
    with common.guard(), h.use() as store:
        found = store.retrieve([point_id], with_vectors=True)
    if not found:
        st.warning("That point is no longer in the collection.")
        st.stop()
    return q.target_from_hit(found[0], n_ch).mid, found[0].payload


def hit_name(x) -> str:
    return f"{x.payload.get('key')} · {common.label_text(x.payload)} · d = {x.distance:.3f}"


if src == "Uploaded image":
    options = (["the Search query"] if query is not None and query["image"] is not None
               else []) + ["a new upload"]
    use = st.radio("Image", options, horizontal=True, key="recon_img_src")
    if use == "the Search query":
        shown, what = query["image"], query["name"]
    else:
        f = st.file_uploader("An image file", key="recon_upload")
        if f is None:
            st.info("Upload an image to reconstruct from.")
            st.stop()
        up = common.read_upload(f.name, f.getvalue())
        if up.error:
            st.error(up.error)
            st.stop()
        shown, what = up.image, f"upload: {f.name}"
    target_images = shown[None]
elif src == "Search hit":
    if not hits:
        common.page_hint("Search first: its hits can be reconstructed here.", "views/search.py",
                         "Go to Search")
        st.stop()
    by_id = {x.id: x for x in hits}
    pid = st.selectbox("Hit", list(by_id), key="recon_hit", format_func=lambda i: hit_name(
        by_id[i]))
    target, payload = stored_mid(pid)
    shown, what = rc.thumb_image(payload), f"hit {payload.get('key')}"
elif src == "Cluster centre":
    clusters = (doc or {}).get("clusters") or []
    if not clusters:
        st.info("No clustering yet: run `idx cluster`, then come back.")
        st.stop()
    ids = [int(c["id"]) for c in clusters]
    if ss.get("recon_cluster") not in ids:
        ss["recon_cluster"] = ids[0]
    sizes = {int(c["id"]): c["size"] for c in clusters}
    cid = st.selectbox("Cluster", ids, key="recon_cluster",
                       format_func=lambda i: f"cluster {i} ({sizes[i]} images)")
    with common.guard():
        target = rc.cluster_centroid(doc, cid)
    what = f"centre of cluster {cid}"
else:   # an edited vector
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
        mid, payload = stored_mid(base)
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

# ----------------------------------------------------------------------------- settings, run
c1, c2, c3, c4, c5 = st.columns([3, 2, 2, 2, 1])
n = c1.slider("Samples", 1, 16, 4, key="recon_n")
presets = list(rc.SCHEDULES)
preset = c2.selectbox("Schedule", presets, index=presets.index("fast"), key="recon_schedule",
                      help="fast: chosen for a CPU; paper: the authors' 100 levels; adaptive: "
                           "Algorithm B.")
levels = c3.number_input("Levels (blank: the preset's)", min_value=1, value=None,
                         key="recon_levels")
steps = c4.number_input("Guidance steps per level (blank: the preset's)", min_value=0,
                        value=None, key="recon_steps")
seed = c5.number_input("Seed", value=0, step=1, key="recon_seed")
sch = rc.schedule(preset, levels=levels, inner_steps=steps)

if shown is not None:
    st.image(common.png_bytes(shown, 2), caption=f"target: {what}", width=160)
else:
    st.caption(f"Target: {what}")
if st.button("Run reconstruction", type="primary", key="recon_run"):
    emb = common.embedder(meta)
    bar = st.progress(0.0, text="waiting for the model...")

    def on_level(p: dict) -> None:
        loss = "" if np.isnan(p["loss"]) else f", φ loss {p['loss']:.2e}"
        bar.progress(min(p["level"] / p["levels"], 1.0),
                     text=f"level {p['level']}/{p['levels']}, σ = {p['sigma']:.3f}{loss}")

    try:
        with common.compute_lock():
            rec = rc.reconstruct(emb.checkpoint.model, target, images=target_images, n=n,
                                 sch=sch, seed=int(seed), phi_config=emb.phi, callback=on_level)
    except ValueError as e:
        bar.empty()
        st.error(f"Cannot reconstruct: {e}")
        st.stop()
    bar.progress(1.0, text=f"done in {rec.seconds:.1f} s")
    ss["recon_result"] = {
        "what": what, "shown": shown, "summary": rc.summary(rec),
        "samples": list((rec.samples.permute(0, 2, 3, 1) * 255).round().byte().numpy()),
    }

res = ss.get("recon_result")
if res:
    summ = res["summary"]
    st.subheader(f"{len(res['samples'])} samples for {res['what']}")
    m1, m2, m3 = st.columns(3)
    med = summ["median_phi_rel_error"]
    m1.metric("Median relative φ error", "-" if med is None else f"{med:.3f}")
    m2.metric("Seconds", f"{summ['seconds']:.1f}")
    m3.metric("Guidance steps", summ["steps"])
    tiles = ([res["shown"]] if res["shown"] is not None else []) + res["samples"]
    st.image(common.png_bytes(np.asarray(rc.grid(tiles, scale=2, cols=min(len(tiles), 9)))),
             caption="target first (when it is an image), then the samples")
    cols = st.columns(min(len(res["samples"]), 8))
    for i, (img, err) in enumerate(zip(res["samples"], summ["phi_rel_error"])):
        with cols[i % len(cols)]:
            st.image(common.png_bytes(img, 2))
            st.caption(f"#{i + 1} φ error {'-' if err is None else f'{err:.3f}'}")
    with st.expander("Details"):
        st.dataframe(pd.DataFrame({"sample": range(1, len(res["samples"]) + 1),
                                   "relative φ error": summ["phi_rel_error"]}), hide_index=True)
        st.json({k: v for k, v in summ.items() if k != "phi_rel_error"})
