"""Reconstruct: draw images whose φ matches a target (search/reconstruct.py, SPEC §4), beside
unguided samples of the same sampler and seed, each with its nearest indexed images, so that
what the guidance added can be seen (search/recon_report.py).

A run holds the server's compute lock (one reconstruction at a time: they use every core). Its
progress is drawn after every network pass, and Streamlit stops a script at its next drawing
call when the user presses Cancel, leaves the page or closes the tab; so the work stops within
one pass and the lock is released."""

from __future__ import annotations

import base64
import time
from dataclasses import replace

import numpy as np
import streamlit as st
from phisearch.search import recon_report as rr
from phisearch.search import reconstruct as rc
from phisearch.ui import common, recon_target

ss = st.session_state
RUNNING = "recon_running"      # {"started": epoch s}: set while a run is on, gone when it ends
SLOW_S = 120                   # estimates above this get a warning before the run

st.title("Reconstruct")
st.caption("Guided sampling: the samples are drawn so that their φ matches the target's. What "
           "they share, and what the unguided samples of the same sampler and seed lack, is "
           "what φ encodes.")

h = common.holder()
with common.guard(), h.use() as store:
    meta = common.meta_or_stop(store)
    doc = store.get_doc("clusters")
choice = recon_target.choose(h, meta, doc)
emb = common.embedder(meta)
on_cpu = emb.device.type == "cpu"


def stopped_note() -> None:
    """Cancel's callback: it runs before the rerun that stops the run, so the note can say
    how long the run had gone."""
    run = ss.pop(RUNNING, None)
    if run:
        ss["recon_note"] = (f"Cancelled after {time.time() - run['started']:.0f} s: nothing was "
                            "kept, and the CPU is free again.")


if RUNNING in ss:   # the script was stopped mid-run without Cancel: the user left or rerun
    ss.pop(RUNNING)
    ss["recon_note"] = ("The last run stopped when the page was left or changed while it ran; "
                        "nothing was kept.")

# ----------------------------------------------------------------------------- settings
c1, c2, c3, c4, c5 = st.columns([3, 2, 2, 2, 1])
n = c1.slider("Samples", 1, 16, 4, key="recon_n", persist_state="session")
slow_ok = (not on_cpu) or st.checkbox(
    "Offer the paper's schedule (100 levels × up to 100 steps: over an hour on a CPU)",
    key="recon_slow_ok", persist_state="session")
presets = [p for p in rc.SCHEDULES if slow_ok or p != "paper"]
preset = c2.selectbox("Schedule", presets, key="recon_schedule", persist_state="session",
                      help="fast: chosen for a CPU; paper: the authors' 100 levels; adaptive: "
                           "Algorithm B.")
levels = c3.number_input("Levels (blank: the preset's)", min_value=1, value=None,
                         key="recon_levels", persist_state="session")
steps = c4.number_input("Guidance steps per level (blank: the preset's)", min_value=0,
                        value=None, key="recon_steps", persist_state="session")
seed = c5.number_input("Seed", value=0, step=1, key="recon_seed", persist_state="session")
unguided = st.checkbox("Also draw unguided samples (same sampler and seed, no target): what "
                       "chance looks like", value=True, key="recon_unguided",
                       persist_state="session")
sch = rc.schedule(preset, levels=levels, inner_steps=steps)


@st.cache_resource(show_spinner=False)
def calibration() -> dict:
    """Server-wide: the last run's time over its estimate (a busy machine runs slower than the
    probe measured), applied to the next estimate."""
    return {"ratio": 1.0}


times = rr.pass_times(emb.checkpoint.model, n, sch.draws)
ratio = calibration()["ratio"]
raw = rr.estimate_seconds(times, sch, choice.images is not None, unguided)
most = ratio * raw
eta = (f"Estimated time: up to {rr.duration_text(most)} here ({sch.levels} levels, up to "
       f"{sch.inner_steps} guidance steps each, {n} samples"
       + ("; the adaptive sampler usually stops far earlier" if sch.algorithm == "B" else "")
       + (f"; {ratio:.1f}x the probe's figure, as the last run took" if ratio != 1.0 else "")
       + ").")
if most > SLOW_S:
    st.warning(eta)
else:
    st.caption(eta)


def exemplar_row(payloads: list[dict]) -> None:
    thumbs = [(common.thumb_bytes(p), f"{p.get('key')} · {common.label_text(p)}")
              for p in payloads if p.get("thumb")]
    if thumbs:
        st.caption("The cluster's exemplars (its members nearest its centre):")
        st.image([t for t, _ in thumbs], width=96, caption=[c for _, c in thumbs])


if choice.shown is not None:
    st.image(common.png_bytes(choice.shown, 2), caption=f"target: {choice.what}", width=160)
else:
    st.caption(f"Target: {choice.what}")
exemplar_row(choice.exemplars)
note = ss.pop("recon_note", None)
if note:
    st.info(note)


# ----------------------------------------------------------------------------- the run
def run_now() -> dict:
    """Wait for the compute lock (counted in the seconds), run guided then unguided sampling
    with a progress bar, then describe every sample. Raises (Streamlit's stop) on Cancel."""
    t0 = time.perf_counter()
    ss[RUNNING] = {"started": time.time()}
    status = st.empty()
    cancel = st.empty()
    cancel.button("Cancel", key="recon_cancel", on_click=stopped_note)
    bar = st.progress(0.0, text="starting...")
    lock = common.compute_lock()
    while not lock.acquire(timeout=0.5):
        status.info(f"Waiting for another reconstruction to finish "
                    f"({time.perf_counter() - t0:.0f} s so far)...")
    waited = time.perf_counter() - t0
    try:
        status.empty()
        phases = [("guided", sch)] + ([("unguided", replace(sch, inner_steps=0))]
                                      if unguided else [])
        state = {"phase": "guided", "done": 0, "level": 0, "levels": sch.levels, "shown": 0.0}

        def draw() -> None:
            done = state["done"] + state["level"] / max(state["levels"], 1)
            frac = min(done / len(phases), 1.0)
            spent = time.perf_counter() - t0
            left_s = (spent - waited) * (1 - frac) / frac if frac > 0 else most
            bar.progress(frac, text=f"{state['phase']} samples: level {state['level']}/"
                                    f"{state['levels']} · {spent:.0f} s · about "
                                    f"{rr.duration_text(left_s)} left")
            state["shown"] = time.perf_counter()

        def tick() -> None:            # after every network pass: Cancel can stop us here
            if time.perf_counter() - state["shown"] > 0.25:
                draw()

        def on_level(p: dict) -> None:
            state["level"], state["levels"] = p["level"], p["levels"]
            draw()

        recs = {}
        for i, (name, s) in enumerate(phases):
            state.update(phase=name, done=i, level=0)
            recs[name] = rc.reconstruct(emb.checkpoint.model, choice.mid, images=choice.images,
                                        n=n, sch=s, seed=int(seed), phi_config=emb.phi,
                                        callback=on_level, tick=tick)
        sampled = time.perf_counter() - t0
        bar.progress(1.0, text="finding each sample's nearest indexed images...")
        target_mid = recs["guided"].phi_target[0].numpy()
        with common.guard(), h.use() as store:
            mean_mid = common.catalog(store, meta).mid.mean(0)
            reports = {name: rr.describe(store, emb, r.images(), target_mid, mean_mid)
                       for name, r in recs.items()}
    finally:
        lock.release()
    seconds = time.perf_counter() - t0
    calibration()["ratio"] = min(max((sampled - waited) / raw, 0.5), 10.0)
    cancel.empty()
    bar.progress(1.0, text=f"done in {seconds:.1f} s" + (f" ({waited:.0f} s of it waiting for "
                                                         "another reconstruction)"
                                                         if waited >= 1 else ""))
    ss.pop(RUNNING, None)
    return {"what": choice.what, "shown": choice.shown, "label": choice.label,
            "exemplars": choice.exemplars, "guided": reports["guided"],
            "unguided": reports.get("unguided"), "summary": rc.summary(recs["guided"]),
            "seconds": seconds, "waited": waited, "schedule": preset}


if st.button("Run reconstruction", type="primary", key="recon_run"):
    ss.pop("recon_result", None)
    try:
        ss["recon_result"] = run_now()
    except ValueError as e:
        ss.pop(RUNNING, None)
        st.error(f"Cannot reconstruct: {e}")
        st.stop()


# ----------------------------------------------------------------------------- the results
def med(reports: list[rr.SampleReport]) -> float:
    return float(np.nanmedian([r.centered_error for r in reports]))


def sample_row(reports: list[rr.SampleReport], title: str, label: str | None) -> None:
    """One column per sample: the sample, its error, its top-10 majority and nearest three."""
    st.markdown(f"**{title}**")
    per_row = min(len(reports), 8)
    for start in range(0, len(reports), per_row):
        cols = st.columns(per_row)
        for i, (col, r) in enumerate(zip(cols, reports[start:start + per_row]), start + 1):
            with col:
                st.image(common.png_bytes(r.image, 2), width=128)
                same = " ✓" if label is not None and r.majority == label else ""
                st.caption(f"#{i} · error {r.centered_error:.2f} · top {r.k}: "
                           f"{r.majority or 'unlabelled'} {r.majority_count}/{r.k}{same}")
                thumbs = [base64.b64decode(x.thumb) for x in r.neighbours if x.thumb]
                if thumbs:
                    st.image(thumbs, width=40)
                st.caption("nearest: " + ", ".join(x.label or "no label" for x in r.neighbours))


res = ss.get("recon_result")
if res:
    g, u = res["guided"], res["unguided"]
    st.subheader(f"{len(g)} samples for {res['what']}")
    m1, m2, m3 = st.columns(3)
    m1.metric("φ error, guided (median)", f"{med(g):.2f}",
              help="||φ(sample) − φ*|| / ||φ* − mean φ of the index||: 0 = the target's φ "
                   "exactly, 1 = no closer than the index's mean.")
    if u:
        m2.metric("φ error, unguided (median)", f"{med(u):.2f}",
                  help="The same measure for samples drawn without the target: chance.")
    waited = f" ({res['waited']:.0f} s waiting)" if res["waited"] >= 1 else ""
    m3.metric("Seconds", f"{res['seconds']:.1f}", help=f"Everything, waiting included{waited}.")
    if res["label"] is not None:
        line = (f"Samples whose 10 nearest indexed images are mostly **{res['label']}** (the "
                f"target's class): guided {rr.agreeing(g, res['label'])}/{len(g)}")
        st.markdown(line + (f", unguided {rr.agreeing(u, res['label'])}/{len(u)}." if u
                            else "."))
    st.caption("Error 1 means the sample's φ is no closer to the target's than the average "
               "image's is; ✓ marks a sample whose nearest images share the target's class. "
               "Under each sample: its three nearest indexed images.")
    sample_row(g, "Guided samples", res["label"])
    if u:
        sample_row(u, "Unguided samples (same sampler and seed, no target)", res["label"])
    with st.expander("Details"):
        st.json({k: v for k, v in res["summary"].items() if k != "phi_rel_error"})
