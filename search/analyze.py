"""`idx analyze`: the analyses of SPEC §3 (analysis.py) on any checkpoint, as small PNGs and
one report.html."""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from phisearch.search.analysis import (
    BLOCKS,
    TAPS,
    Analysis,
    AnalyzeConfig,
    Progress,
    compute,
    load_images,
)

__all__ = ["BLOCKS", "TAPS", "AnalyzeConfig", "analyze"]


# ------------------------------------------------------------------------------------------
# Figures


def _save(fig, path: Path, dpi: int, palette: bool = False) -> Path:
    """Write the figure as PNG. palette: photos are stored with a 256-colour adaptive palette,
    which keeps an image grid near a third of its full-colour size."""
    import matplotlib.pyplot as plt

    if palette:
        from PIL import Image

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        buf.seek(0)
        with Image.open(buf) as im:
            im.convert("RGB").quantize(256).save(path, optimize=True)
    else:
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def fig_pr(a: Analysis, path: Path, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(11, 4.8))
    bins = np.linspace(0, 1, 41)
    for ax, b in zip(axes.flat, BLOCKS):
        for side, color in (("in", "tab:gray"), ("out", "tab:red")):
            v = a.pr[f"{b}.{side}"]
            v = v[np.isfinite(v)]
            ax.hist(v, bins=bins, color=color, alpha=0.6,
                    label=f"{side} (mean {np.mean(v):.2f})" if len(v) else side)
        ax.set_title(b, fontsize=10)
        ax.set_xlim(0, 1)
        ax.legend(fontsize=7, frameon=False)
        ax.tick_params(labelsize=7)
    ax = axes.flat[-1]
    x = np.arange(len(BLOCKS))
    for side, color in (("in", "tab:gray"), ("out", "tab:red")):
        ax.plot(x, [np.nanmean(a.pr[f"{b}.{side}"]) for b in BLOCKS], "o-", color=color,
                label=side, ms=4)
    ax.set_xticks(x, BLOCKS, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_title("mean PR along the network", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    fig.supxlabel("participation ratio per image (last panel: mean per block)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi)


def fig_stability(a: Analysis, cfg: AnalyzeConfig, path: Path, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    cmap = plt.get_cmap("viridis")
    for ax, data, title in ((axes[0], a.stability, "cosine of block-output means"),
                            (axes[1], a.stability_c, "same, mean over images subtracted")):
        for i, b in enumerate(BLOCKS):
            ax.plot(cfg.sweep, data[b], "o-", ms=3, lw=2.5 if b == "M" else 1.2,
                    color="tab:red" if b == "M" else cmap(i / len(BLOCKS)), label=b)
        ax.axvline(cfg.sigma, color="k", ls=":", lw=1)
        ax.set_xscale("symlog", linthresh=min((s for s in cfg.sweep if s > 0), default=0.01))
        ax.set_xlim(0, max(cfg.sweep) * 1.1 if max(cfg.sweep) > 0 else 1)
        ax.set_xticks(cfg.sweep, [f"{s:g}" for s in cfg.sweep], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel(f"σ2 (σ1 = {cfg.sigma:g}, dotted)")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8, ncol=2, frameon=False)
    fig.tight_layout()
    return _save(fig, path, dpi)


def fig_channel_pr(a: Analysis, path: Path, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    v = a.channel_pr[np.isfinite(a.channel_pr)]
    ax.hist(v, bins=np.linspace(0, 1, 41), color="tab:blue")
    for c in a.selective:
        ax.axvline(a.channel_pr[c], color="tab:red", lw=0.8)
    ax.set_xlabel("participation ratio of a middle-block channel across images")
    ax.set_ylabel("channels")
    fig.tight_layout()
    return _save(fig, path, dpi)


def fig_top_images(a: Analysis, images: np.ndarray, labels: np.ndarray, names: list[str],
                   cfg: AnalyzeConfig, path: Path, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    rows = max(len(a.selective), 1)
    # 0.8 inch at 80 dpi: the 64 px images at their own size
    fig, axes = plt.subplots(rows, cfg.tiles, figsize=(cfg.tiles * 0.8, rows * 0.95),
                             squeeze=False)
    for r, c in enumerate(a.selective):
        top = np.argsort(-a.mid[:, c], kind="stable")[:cfg.tiles]
        for j, i in enumerate(top):
            ax = axes[r, j]
            ax.imshow(images[i], interpolation="nearest")
            name = names[labels[i]] if 0 <= labels[i] < len(names) else ""
            ax.set_title(name[:12], fontsize=6, pad=1)
        axes[r, 0].set_ylabel(f"ch {c}\nPR {a.channel_pr[c]:.3f}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
    fig.tight_layout(pad=0.3)
    return _save(fig, path, dpi, palette=True)


def fig_subspaces(g: dict, names: list[str], path: Path, dpi: int) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.6))
    chans = g["specific_a"] + g["common"] + g["specific_b"]
    x = np.arange(len(chans))
    ma, mb = np.asarray(g["mean_a"])[chans], np.asarray(g["mean_b"])[chans]
    na, nb = (names[g[k]] if g[k] < len(names) else str(g[k]) for k in ("a", "b"))
    ax.bar(x - 0.2, ma, 0.4, color="tab:orange", label=f"{na} (n={g['n_a']})")
    ax.bar(x + 0.2, mb, 0.4, color="tab:blue", label=f"{nb} (n={g['n_b']})")
    k = len(g["specific_a"])
    for edge in (k - 0.5, k + len(g["common"]) - 0.5):
        ax.axvline(edge, color="k", lw=0.8, ls=":")
    ax.set_xticks(x, [str(c) for c in chans], fontsize=7, rotation=90)
    ax.set_xlabel(f"channel: specific to {na} | common | specific to {nb}")
    ax.set_ylabel("mean activation")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return _save(fig, path, dpi)


# ------------------------------------------------------------------------------------------
# Report


def summary(a: Analysis, cfg: AnalyzeConfig, names: list[str]) -> dict:
    """The numbers quoted in report.html (and written to analysis.json)."""
    cpr = a.channel_pr[np.isfinite(a.channel_pr)]
    g = {k: v for k, v in a.groups.items() if k not in ("mean_a", "mean_b")}
    for k in ("a", "b"):
        if k in g:
            g[f"name_{k}"] = names[g[k]] if g[k] < len(names) else str(g[k])
    return {
        "pr_mean": {t: round(float(np.nanmean(a.pr[t])), 4) for t in TAPS},
        "dead_channels": {t: a.dead[t] for t in TAPS},
        "stability": {"sigma1": cfg.sigma, "sigma2": list(cfg.sweep),
                      "cosine": {b: [round(x, 4) for x in v] for b, v in a.stability.items()},
                      "cosine_centred": {b: [round(x, 4) for x in v]
                                         for b, v in a.stability_c.items()}},
        "channels": {"total": len(a.channel_pr), "dead": int((a.active_images == 0).sum()),
                     "selective_pr_lt_0.25": int((cpr < 0.25).sum()),
                     "common_pr_gt_0.75": int((cpr > 0.75).sum()),
                     "median_pr": round(float(np.median(cpr)), 4) if len(cpr) else None,
                     "shown": [{"channel": c, "pr": round(float(a.channel_pr[c]), 4),
                                "active_images": int(a.active_images[c])} for c in a.selective]},
        "mid_active_per_image": round(float((a.mid > 0).sum(1).mean()), 2),
        "groups": g,
    }


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def paragraphs(s: dict, cfg: AnalyzeConfig, meta: dict) -> dict[str, str]:
    """A short explanation per figure, with its numbers."""
    pm = s["pr_mean"]
    rows = ", ".join(f"{b} {pm[b + '.in']:.2f} → {pm[b + '.out']:.2f}" for b in BLOCKS)
    denser = [b for b in BLOCKS if pm[b + ".out"] > pm[b + ".in"]]
    sparser = [b for b in BLOCKS if pm[b + ".out"] < pm[b + ".in"]]
    st, sc = s["stability"]["cosine"], s["stability"]["cosine_centred"]
    i1 = list(cfg.sweep).index(cfg.sigma) if cfg.sigma in cfg.sweep else None
    best = max(BLOCKS, key=lambda b: float(np.mean(st[b])))
    best_c = max(BLOCKS, key=lambda b: float(np.mean(sc[b])))

    def at(curves: dict, i: int) -> str:
        return ", ".join(f"{b} {curves[b][i]:.3f}" for b in BLOCKS)
    ch = s["channels"]
    out = {
        "pr": (f"Participation ratio PR(v) = (Σv)²/(C·Σv²) (|v| where signed) of each block's "
               f"spatially averaged input and output, over {meta['images']} images at "
               f"σ = {cfg.sigma:g}. Mean PR input → output: {rows}. Blocks that make the code "
               f"denser (PR up): {', '.join(denser) or 'none'}; sparser (PR down): "
               f"{', '.join(sparser) or 'none'}. "
               "In the paper the encoder blocks densify and the middle block and decoder "
               "sparsify (middle block ≈ 0.75 → 0.25). PR counts every channel, so channels "
               "that never fire cap it: never active over these images, block outputs: "
               + ", ".join(f"{b} {s['dead_channels'][b + '.out']}" for b in BLOCKS) + "."),
        "stability": (
            f"Mean cosine between a block's output means at σ1 = {cfg.sigma:g} and at σ2 "
            f"(another noise draw), over {min(cfg.stability_images, meta['images'])} images; "
            "right: the same after subtracting each block's mean over the images, which removes "
            "the part every image shares and keeps what tells images apart. Most stable on "
            "average over "
            f"the sweep: {best} (raw), {best_c} (centred). At σ2 = {cfg.sweep[0]:g}, raw: "
            f"{at(st, 0)}; centred: {at(sc, 0)}. At σ2 = {cfg.sweep[-1]:g}, centred: "
            f"{at(sc, -1)}."
            + (f" Noise floor (σ2 = σ1), centred: {at(sc, i1)}." if i1 is not None else "")),
        "channel_pr": (f"PR of each of the {ch['total']} middle-block channels across the images "
                       f"(low = selective, high = common). Median {ch['median_pr']}; "
                       f"{ch['selective_pr_lt_0.25']} channels below 0.25, "
                       f"{ch['common_pr_gt_0.75']} above 0.75, {ch['dead']} never active. "
                       f"An image has {s['mid_active_per_image']} active channels on average. "
                       "Red lines: the channels shown below."),
        "top": ("The images that most activate the most selective channels (lowest PR among "
                f"channels on in at least {cfg.min_active} images): "
                + "; ".join(f"channel {c['channel']} (PR {c['pr']:.3f}, on in "
                            f"{c['active_images']} images)" for c in ch["shown"]) + "."),
    }
    g = s["groups"]
    if g:
        e = g["energy"]
        out["subspaces"] = (
            f"Mean middle-block activation of two label groups, {g['name_a']} (n={g['n_a']}) "
            f"and {g['name_b']} (n={g['n_b']}), on the {len(g['specific_a'])} channels most "
            f"specific to each and the {len(g['common'])} most shared, of {g['channels']} "
            "(the pair of labels farthest apart in Δ/s). Share of a group's φ energy (Σφ_c²) "
            f"on {g['name_a']}'s specific channels: {e['a_on_specific_a']:.1%} for "
            f"{g['name_a']} vs "
            f"{e['b_on_specific_a']:.1%} for {g['name_b']}; on {g['name_b']}'s: "
            f"{e['b_on_specific_b']:.1%} vs {e['a_on_specific_b']:.1%}; on the common ones: "
            f"{e['a_on_common']:.0%} and {e['b_on_common']:.0%}.")
    return out


def write_report(out: Path, figs: dict[str, Path], text: dict[str, str], meta: dict) -> Path:
    titles = {"pr": "Sparsity per block", "stability": "Stability across noise",
              "channel_pr": "Channel selectivity", "top": "Most selective channels",
              "subspaces": "Union of subspaces"}
    parts = [f"<h2>{titles[k]}</h2>\n<p>{html.escape(text[k])}</p>\n"
             f'<img alt="{k}" src="data:image/png;base64,{_b64(p)}">'
             for k, p in figs.items() if k in text]
    trained = f", {meta['epochs']:.1f} epochs" if meta.get("epochs") else ""
    head = (f"checkpoint {meta['checkpoint']} (sha256 {meta['model_sha256'][:12]}{trained}), "
            f"{meta['images']} images from {', '.join(Path(u).name for u in meta['data'])}, "
            f"σ = {meta['sigma']:g}, {meta['draws']} draw(s) per σ, seed {meta['seed']}.")
    doc = ("<!doctype html>\n<html><head><meta charset='utf-8'><title>phisearch analyze</title>"
           "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}"
           "img{max-width:100%}p{line-height:1.4}</style></head><body>\n"
           f"<h1>What the denoiser's code looks like (SPEC §3)</h1>\n<p>{html.escape(head)}</p>\n"
           + "\n".join(parts) + "\n</body></html>\n")
    path = out / "report.html"
    path.write_text(doc)
    return path


def analyze(checkpoint: str | None, data: Sequence[str], out: str | Path,
            cfg: AnalyzeConfig = AnalyzeConfig(), on_progress: Progress | None = None) -> dict:
    """Compute, draw and write every figure, report.html and analysis.json into `out`."""
    import matplotlib

    matplotlib.use("Agg")
    from phisearch.indexer.model import checkpoint as ckpt

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    c = ckpt.load(checkpoint, "cpu")
    images, labels, names = load_images(data, cfg.images)
    a = compute(c.model, images, labels, cfg, on_progress)
    s = summary(a, cfg, names)
    figs = {"pr": fig_pr(a, out / "pr_blocks.png", cfg.dpi),
            "stability": fig_stability(a, cfg, out / "stability.png", cfg.dpi),
            "channel_pr": fig_channel_pr(a, out / "channel_pr.png", cfg.dpi),
            "top": fig_top_images(a, images, labels, names, cfg, out / "top_channels.png",
                                  cfg.dpi)}
    if a.groups:
        figs["subspaces"] = fig_subspaces(a.groups, names, out / "subspaces.png", cfg.dpi)
    meta = {"checkpoint": c.name, "model_sha256": c.sha256, "epochs": c.info.get("epochs"),
            "images": len(images),
            "data": list(data), "sigma": cfg.sigma, "draws": cfg.draws, "seed": cfg.seed}
    report = write_report(out, figs, paragraphs(s, cfg, meta), meta)
    result = {**meta, **s, "config": asdict(cfg), "seconds": round(time.perf_counter() - t0, 1),
              "files": [p.name for p in figs.values()] + [report.name, "analysis.json"]}
    (out / "analysis.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
