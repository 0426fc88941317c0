"""Which sampling schedule should be the default? (issue 26 part 4, SPEC §4)

Scores several reconstruction schedules in one run, on the same targets and seeds, with
bench/recon_fidelity.py's measure: for each schedule, guided and unguided samples whose top-10
majority label is the target's class, seconds per sample, the fidelity per second, the median φ
error (relative to ||φ*||, and centered: relative to the target's distance from the index's mean
φ, 1 = no closer than the average image), and whether the samples look like images at all
(search/recon_report.image_stats: spatial contrast, the share of spectral energy above 4 cycles
per image, the share of flat images) beside the same statistics of the real target images, and
the real images' own top-10 majority (the ceiling), once.

    python bench/recon_schedules.py --queries $D/imagenette-test-000000.tar --targets 50 -n 4 \
        --schedules default --tag small64_21919

--schedules takes candidate names (CANDIDATES), presets of search/reconstruct.py (SCHEDULES),
lists (LISTS: quick, default, all) and custom rows "BASE:field=value,field=value" (e.g.
"fast:levels=30,sigma_max=0.7"). Each row's `python` field is the Schedule(...) to paste as the
new SCHEDULES["fast"] line. Writes bench/results/recon_schedules_<tag>.json and prints a markdown
table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch
from phisearch.indexer.cli.common import default_store
from phisearch.indexer.model.embedder import Embedder, dense_of
from phisearch.indexer.store import StoreConfig, open_store
from phisearch.search import recon_report as rr
from phisearch.search import reconstruct as R
from phisearch.search.reconstruct import SCHEDULES, Schedule

sys.path.insert(0, str(Path(__file__).resolve().parent))   # a sibling script, not a package
import recon_fidelity as rf

# Candidates for the default. Unless said, the settings of `fast` until 2026-12-06 (10 geometric
# levels σ 1 -> 0.03, 3 Adam steps a level at lr 0.03, stop at 5% of the starting loss, 4 draws
# for the σ-matched target, ancestral re-noising); `fast` itself is today's preset.
FAST = Schedule(levels=10, inner_steps=3, lr=0.03, tol=0.05, spacing="geometric", draws=4,
                renoise="ancestral")
CANDIDATES: dict[str, Schedule] = {
    "fast": SCHEDULES["fast"],                                     # today: 20 levels 5.0 -> 0.03
    "A10": FAST,                                                   # `fast` until 2026-12-06
    "A20": replace(FAST, levels=20),                               # more levels
    "A40": replace(FAST, levels=40),
    "A20-linear": replace(FAST, levels=20, spacing="linear"),      # the authors' spacing
    # Start lower: a blind denoiser trained with few large-σ examples is better below σ 0.7.
    "A10-from0.6": replace(FAST, sigma_max=0.6),
    "A20-from0.6": replace(FAST, levels=20, sigma_max=0.6),
    "A20-linear-from0.5": replace(FAST, levels=20, spacing="linear", sigma_max=0.5),
    # docs/reconstruction.md: at lr 0.01, 20 levels x 10 steps matched about as well as `fast`.
    "A20x10-lr0.01": replace(FAST, levels=20, inner_steps=10, lr=0.01, tol=0.01),
    # Algorithm B with the authors' step sizes, capped at 200 iterations (about what h0 0.01 and
    # beta 0.05 need from σ 1 to 0.01); and a quicker one (bigger steps, less noise injected).
    "B-cap200": replace(SCHEDULES["adaptive"], levels=200, inner_steps=3, lr=0.03, tol=0.05),
    "B-quick": replace(SCHEDULES["adaptive"], levels=60, inner_steps=3, lr=0.03, tol=0.05,
                       h0=0.05, beta=0.5, sigma_min=0.03),
    # Keep the noise each level estimated instead of drawing it all anew (DDPM's ancestral step,
    # search/schedules.py RENOISE): unguided, these draw textured scenes where "fresh" draws grey.
    "fast-fresh": replace(FAST, renoise="fresh"),                  # `fast` before ancestral
    "A30-ancestral": replace(FAST, levels=30, renoise="ancestral"),
    "A30-linear-ancestral": replace(FAST, levels=30, spacing="linear", renoise="ancestral"),
    # Start higher. In an orthonormal basis an image's coarsest components vary far more than σ 1
    # (the mean colour of a 64x64 Imagenette image: std 0.14 x 64 = 9 against noise 1), so a sampler
    # that starts from the mean image at σ 1 cannot draw them and stays grey (pixel std about 0.05
    # unguided, real images 0.21). The network never trained above σ 1: these measure how far its
    # extrapolation carries.
    "A10-from2": replace(FAST, sigma_max=2.0),
    "A20-from2": replace(FAST, levels=20, sigma_max=2.0),
    "A20-from3": replace(FAST, levels=20, sigma_max=3.0),
    "A20-from5": replace(FAST, levels=20, sigma_max=5.0),
    "A30-from3": replace(FAST, levels=30, sigma_max=3.0),
}
LISTS: dict[str, list[str]] = {
    "quick": ["fast", "A20-from0.6", "B-quick"],
    "default": ["fast", "A20", "A40", "A20-linear", "A10-from0.6", "A20-from0.6",
                "A20-linear-from0.5", "B-quick", "B-cap200"],
    "renoise": ["fast-fresh", "A10", "A30-ancestral", "A30-linear-ancestral"],
    "start": ["A10", "A10-from2", "A20-from2", "A20-from3", "A20-from5", "A30-from3"],
    "all": list(CANDIDATES),
}


def _custom(token: str) -> Schedule:
    """ "BASE:field=value,..." -> the named schedule with those fields replaced."""
    base_name, _, spec = token.partition(":")
    base = CANDIDATES.get(base_name) or SCHEDULES.get(base_name)
    if base is None:
        raise ValueError(f'unknown schedule "{base_name}" in "{token}"')
    names = {f.name for f in fields(Schedule)}
    over = {}
    for item in filter(None, spec.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in names:
            raise ValueError(f'bad field "{item}" in "{token}"; fields: {sorted(names)}')
        kind = type(getattr(base, key))
        try:
            over[key] = kind(value)
        except ValueError:
            raise ValueError(f'{key}={value}: not a {kind.__name__}') from None
    return replace(base, **over)


def resolve(tokens: list[str]) -> dict[str, Schedule]:
    """Schedules by name, in order, without repeats: list names expand to their candidates;
    candidate and SCHEDULES names and "BASE:field=value,..." rows are taken as they are."""
    out: dict[str, Schedule] = {}
    for token in tokens:
        for name in LISTS.get(token, [token]):
            if name in CANDIDATES:
                out[name] = CANDIDATES[name]
            elif name in SCHEDULES:
                out[name] = SCHEDULES[name]
            elif ":" in name:
                out[name] = _custom(name)
            else:
                raise ValueError(f'unknown schedule "{name}"; choose from lists {sorted(LISTS)}, '
                                 f'candidates {sorted(CANDIDATES)}, presets {sorted(SCHEDULES)} '
                                 'or "BASE:field=value,..."')
    return out


def schedule_line(sch: Schedule) -> str:
    """The Schedule(...) call with the fields that differ from the defaults: what to paste."""
    default = Schedule()
    args = [f"{f.name}={getattr(sch, f.name)!r}" for f in fields(Schedule)
            if getattr(sch, f.name) != getattr(default, f.name)]
    return f"Schedule({', '.join(args)})"


def mean_mid(store, sparse_dim: int) -> np.ndarray:
    """The index's mean middle-block φ (the reference of the centered error), from every point's
    sparse vector."""
    total, count = np.zeros(sparse_dim, np.float64), 0
    for h in store.scroll(with_vectors=True, batch=1024):
        total += dense_of([h.sparse or ([], [])], sparse_dim)[0]
        count += 1
    return (total / max(count, 1)).astype(np.float32)


def safe_name(name: str) -> str:
    """A file name for a schedule's name (custom rows hold ':', ',' and '=')."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_grid(path: Path, targets: np.ndarray, guided: np.ndarray, unguided: np.ndarray,
               cols: int = 10) -> None:
    """Three rows of up to `cols` tiles: the targets, a guided sample of each, unguided samples
    of the same seed: to see whether samples look like images."""
    k = min(cols, len(targets))
    path.parent.mkdir(parents=True, exist_ok=True)
    R.grid([*targets[:k], *guided[:k], *unguided[:k]], scale=2, cols=k).save(path)


def _rate(ok: np.ndarray) -> float:
    return round(float(np.mean(ok)), 4)


def _median(x) -> float | None:
    x = np.asarray(x, np.float64)
    return None if np.isnan(x).all() else round(float(np.nanmedian(x)), 4)


def score_schedules(cfg: StoreConfig, emb: Embedder, tg: rf.Targets,
                    schedules: dict[str, Schedule], n: int, seed: int = 0,
                    batch_targets: int = 10,
                    progress: Callable[[str], None] | None = None,
                    grids: Path | None = None) -> dict:
    """The benchmark's core: every schedule on the same targets and seeds. Returns
    {"real": ..., "schedules": [...]} (see the module docstring for what each number is).
    grids: a folder for one PNG per schedule (targets, a guided sample of each, unguided)."""
    say = progress or (lambda s: None)
    model = emb.checkpoint.model.eval()
    target_of = np.repeat(np.arange(len(tg.images)), n)
    want, skip = tg.labels[target_of], [tg.ids[t] for t in target_of]
    with open_store(cfg) as st:
        r_ok, _, r_mid = rf.keeps_class(st, emb, tg.images, tg.labels, tg.ids)
        mean = mean_mid(st, r_mid.shape[1])
    real = {"top10_majority_is_its_class": _rate(r_ok), "image_stats": rr.image_stats(tg.images)}
    rows = []
    for name, sch in schedules.items():
        say(f"{name}: {schedule_line(sch)}")
        g_u8, errors, t_g = rf.draw_guided(model, tg.images, n, sch, seed, emb, batch_targets,
                                           progress=lambda s, nm=name: say(f"  {nm} {s}"))
        u_u8, t_u = rf.draw_unguided(model, len(g_u8), sch, seed)
        with open_store(cfg) as st:
            g_ok, g_maj, g_mid = rf.keeps_class(st, emb, g_u8, want, skip)
            u_ok, _, u_mid = rf.keeps_class(st, emb, u_u8, want, skip)
        if grids is not None:
            write_grid(grids / f"{safe_name(name)}.png", tg.images, g_u8[::n], u_u8[::n])
        g_s, u_s = t_g / len(g_u8), t_u / len(u_u8)
        lift = float(g_ok.mean() - u_ok.mean())
        rows.append({
            "name": name, "settings": asdict(sch), "python": schedule_line(sch),
            "guided": {
                "top10_majority_is_target_class": _rate(g_ok),
                "per_target_majority_of_samples": _rate(
                    rf.per_target_majority(g_maj, tg.labels, n)),
                "median_phi_rel_error": _median(errors),
                "median_centered_error": _median(
                    rr.centered_error(g_mid, r_mid[target_of], mean)),
                "seconds": round(t_g, 2), "seconds_per_sample": round(g_s, 3),
                "image_stats": rr.image_stats(g_u8)},
            "unguided": {
                "top10_majority_is_target_class": _rate(u_ok),
                "median_centered_error": _median(
                    rr.centered_error(u_mid, r_mid[target_of], mean)),
                "seconds": round(t_u, 2), "seconds_per_sample": round(u_s, 3),
                "image_stats": rr.image_stats(u_u8)},
            "lift": round(lift, 4),
            "guided_per_second": round(float(g_ok.mean()) / g_s, 4),
            "lift_per_second": round(lift / g_s, 4),
        })
        say(f"{name}: guided {g_ok.mean():.3f}, unguided {u_ok.mean():.3f}, {g_s:.2f} s a sample")
    return {"real": real, "schedules": rows}


def table(result: dict) -> str:
    """The markdown table: one row per schedule, the real images first."""
    def one(v, fmt="{:.3f}") -> str:
        return "–" if v is None else fmt.format(v)

    def pair(a, b, fmt="{:.3f}") -> str:
        return f"{one(a, fmt)} / {one(b, fmt)}"

    real = result["real"]
    rs = real["image_stats"]
    lines = [
        ("| schedule | s/sample guided / unguided | top-10 = class guided / unguided | lift | "
         "guided per s | lift per s | φ rel err | centered err g / u | pixel std g / u | "
         "high-freq g / u | flat g / u |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
        (f"| real images (ceiling) | – | {real['top10_majority_is_its_class']:.3f} | – | – | – "
         f"| – | – | {rs['pixel_std']:.3f} | {rs['high_freq_fraction']:.3f} | "
         f"{rs['flat_fraction']:.2f} |")]
    for r in result["schedules"]:
        g, u = r["guided"], r["unguided"]
        gs, us = g["image_stats"], u["image_stats"]
        lines.append(
            f"| {r['name']} | {pair(g['seconds_per_sample'], u['seconds_per_sample'], '{:.2f}')} "
            f"| {pair(g['top10_majority_is_target_class'], u['top10_majority_is_target_class'])}"
            f" | {r['lift']:+.3f} | {r['guided_per_second']:.3f} | {r['lift_per_second']:+.3f} "
            f"| {one(g['median_phi_rel_error'])} "
            f"| {pair(g['median_centered_error'], u['median_centered_error'], '{:.2f}')} "
            f"| {pair(gs['pixel_std'], us['pixel_std'])} "
            f"| {pair(gs['high_freq_fraction'], us['high_freq_fraction'])} "
            f"| {pair(gs['flat_fraction'], us['flat_fraction'], '{:.2f}')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", required=True, help="Labelled test shard(s).")
    ap.add_argument("--targets", type=int, default=50)
    ap.add_argument("-n", type=int, default=4, help="Samples per target.")
    ap.add_argument("--schedules", nargs="+", default=["quick"],
                    help=f"Lists {sorted(LISTS)}, candidates, SCHEDULES presets or "
                         '"BASE:field=value,...".')
    ap.add_argument("--batch-targets", type=int, default=10, help="Targets per sampler batch.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store", default=default_store())
    ap.add_argument("--collection", default="phisearch")
    ap.add_argument("--tag", default="run", help="Names the result file.")
    ap.add_argument("--out", type=Path, default=None,
                    help="Default: bench/results/recon_schedules_<tag>.json.")
    ap.add_argument("--grids", type=Path, default=None,
                    help="Also write one PNG per schedule here (targets, guided, unguided).")
    args = ap.parse_args(argv)
    try:
        schedules = resolve(args.schedules)
    except ValueError as e:
        ap.error(str(e))
    out = args.out or Path(__file__).resolve().parent / "results" / \
        f"recon_schedules_{args.tag}.json"

    cfg = StoreConfig(path=args.store, collection=args.collection, busy_wait=60)
    meta, emb = rf.open_collection(cfg)
    tg = rf.load_targets(args.queries, args.targets)
    t0 = time.perf_counter()
    scored = score_schedules(cfg, emb, tg, schedules, args.n, args.seed, args.batch_targets,
                             progress=lambda s: print(s, file=sys.stderr, flush=True),
                             grids=args.grids)
    with open_store(cfg) as st:
        points = st.count()
    result = {
        "store": args.store, "collection": args.collection, "points": points,
        "checkpoint": meta.get("checkpoint"), "model_sha256": meta["model_sha256"],
        "readout": meta.get("readout"), "phi": {k: meta[k] for k in ("sigma", "draws", "seed")},
        "queries": args.queries, "targets": len(tg.images), "samples_per_target": args.n,
        "classes": len(np.unique(tg.labels)), "seed": args.seed,
        "image_stats_definition": {
            "pixel_std": "mean over images of the per-channel spatial std on [0, 1]",
            "high_freq_fraction": f"mean share of luminance spectral energy (Hann window, DC "
                                  f"left out) above {rr.HIGH_FREQ_CUTOFF:g} cycles per pixel",
            "flat_fraction": f"share of images with pixel_std < {rr.FLAT_STD}"},
        **scored,
        "seconds_total": round(time.perf_counter() - t0, 1),
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "command": "python bench/recon_schedules.py " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"\n{len(tg.images)} targets x {args.n} samples, seed {args.seed}; wrote {out}")


if __name__ == "__main__":
    main()
