"""The Tiny ImageNet learning curve of the line small64 is trained along, and when each of issue
26's bars would be met at its rate (the fallback of the issue's "Done when").

Points are `bench/recipe_score.py` rows already measured (validation protocols, moving-average
weights unless the row is a fixed shipped file), placed at their Tiny ImageNet CPU-minutes: the
process CPU time inside the training steps since the Imagenette-only small64 (21,919 steps) the
line warm-started from. LINE lists the rows of the line (each decision's winner continues it, shipped
or not), each with the minutes its arm's `cpu_minutes` count from (a decision arm counts from its
branch point).

For each set and readout two fits (least squares, every point equal) bracket the prediction:
kNN@10 = a + b ln(1 + minutes / 30), a rise that slows as training goes on (the pessimistic
one), and a + b minutes, a rise that keeps its pace (the optimistic one). The prediction is the
minutes at which a fit reaches the bar; "not at this rate" when it is flat or falling, or
reaches it beyond 100x the minutes measured. The bars are those of the issue on the test
protocols; the points are validation protocols (the same kind of queries, disjoint), so a
prediction is for the test bar.

    python bench/tiny_curve.py [--png docs/tiny_curve.png]

Writes bench/results/tiny_curve.json and prints the markdown tables of the model card.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SCALE = 30.0   # minutes: where the fitted rise starts to slow (ln(1 + m / SCALE))
# Every point is scored with one readout: the K = 128 default every recipe row used (rows that
# carry no "readout" predate the K = 256 switch and were scored with it).
CURVE_READOUT = "blocks+white128+l2"

# (results file, arm label, weights, Tiny minutes the arm's cpu_minutes count from, note[,
#  fewest steps: rows of that arm with fewer belong to an earlier part of the line])
LINE: list[tuple] = [
    ("recipe_warm_vs_scratch.json", "shipped", "fixed", 0.0,
     "small64 shipped (Imagenette only), the line's start"),
    ("recipe_warm_vs_scratch.json", "warm", "ema", 0.0, "decision 1's warm arm, constant 1e-4"),
    # decision 2 branched at 33,079 steps: train_cpu_seconds 13,881.9 - small64's 8,320.2
    ("recipe_lr_schedule.json", "start", "ema", 92.7,
     "decision 2's branch point: the warm arm at 33,079 steps"),
    ("recipe_lr_schedule.json", "cos", "ema", 92.7,
     "decision 2's winner: cosine 3e-4 -> 0 over 12,000 steps"),
    # decision 3 branched at 45,079 steps: train_cpu_seconds 21,001.1 - 8,320.2
    ("recipe_sigma_dist.json", "focus", "ema", 211.3,
     "decision 3's winner: --sigma-dist focus, a second cosine cycle (not shipped: the rule)"),
    # decisions 4/5 branched at 57,079 steps: train_cpu_seconds 26,664.0 - 8,320.2
    ("recipe_res_batch.json", "base", "ema", 305.7,
     "decisions 4/5's winner: 64x64, batch 32, a third cosine cycle (shipped)"),
    # scripts/train_line.sh, scored with --arm line=runs/line@8320.2: minutes since small64
    ("recipe_line.json", "line", "ema", 0.0,
     "the line: decision 6's winner (wide) again from the shipped model, cosine 1e-4 -> 0 over "
     "18,000 steps"),
    # scripts/ship_tiny.py --weights ema: the line's candidates; their cpu_minutes count from the
    # shipped 69,079-step model it warm-started from (train_cpu_seconds 32,417.5 - 8,320.2)
    ("recipe_ship.json", "candidate", "ema", 401.6,
     "the line: a ship candidate (decided by scripts/ship_tiny.py)", 69080),
]
# set -> (validation protocol, readout key, bar kind, value): issue 26's "Done when"
BARS = [
    ("tiny", "phi", "absolute", 0.20, "Tiny default readout >= 0.20"),
    ("tiny", "phi_mid_raw", "x untrained", 1.5, "Tiny paper's φ >= 1.5x untrained middle block"),
    ("imagenette", "phi", "x untrained", 1.3, "Imagenette default >= 1.3x untrained"),
    ("imagenette", "phi_mid_raw", "x untrained", 1.0, "Imagenette paper's φ >= untrained"),
]
UNTRAINED = {"phi": "random_init", "phi_mid_raw": "random_init_mid_raw"}


def points() -> list[dict]:
    """The line's rows in order of minutes: {minutes, note, steps, knn: {set: {rep: value}}}."""
    out = []
    for file, arm, weights, offset, note, *fewest in LINE:
        path = RESULTS / file
        if not path.is_file():
            continue
        rows = [r for r in json.loads(path.read_text())["rows"]
                if r["arm"] == arm and r["weights"] == weights
                and r["steps"] >= (fewest[0] if fewest else 0)
                and r.get("readout", CURVE_READOUT) == CURVE_READOUT]
        for r in rows:
            minutes = offset + (r["cpu_minutes"] or 0.0)
            out.append({"minutes": round(minutes, 1), "note": note, "steps": r["steps"],
                        "checkpoint": r["checkpoint"], "knn": {
                            s: r["knn@10"][f"{s}-val"] for s in ("tiny", "imagenette")
                            if f"{s}-val" in r["knn@10"]}})
    return sorted(out, key=lambda p: p["minutes"])


def fit(xs: list[float], ys: list[float], form: str = "log") -> tuple[float, float]:
    """(a, b) of y = a + b ln(1 + x / SCALE) ("log") or y = a + b x ("linear"), least squares."""
    u = np.log1p(np.asarray(xs) / SCALE) if form == "log" else np.asarray(xs)
    b, a = np.polyfit(u, np.asarray(ys), 1)
    return float(a), float(b)


def minutes_to(a: float, b: float, target: float, measured: float,
               form: str = "log") -> float | None:
    """Minutes at which the fit reaches `target`; None when it never does at this rate."""
    if a >= target:
        return 0.0
    if b <= 0:
        return None
    m = SCALE * math.expm1((target - a) / b) if form == "log" else (target - a) / b
    return m if m <= 100 * max(measured, 1.0) else None


def predict(pts: list[dict]) -> list[dict]:
    """One row a bar: the target on validation (untrained measured by the same code), the fit,
    the latest value and the predicted minutes."""
    out = []
    for s, rep, kind, value, name in BARS:
        have = [p for p in pts if s in p["knn"]]
        if len(have) < 2:
            continue
        xs = [p["minutes"] for p in have]
        ys = [p["knn"][s][rep] for p in have]
        untrained = have[-1]["knn"][s][UNTRAINED[rep]]
        target = value if kind == "absolute" else value * untrained
        row = {"bar": name, "target_val": round(target, 4), "latest": round(ys[-1], 4),
               "at_minutes": xs[-1], "met": ys[-1] >= target, "fits": {}}
        for form, text in (("log", f"a + b ln(1 + minutes / {SCALE:g})"),
                           ("linear", "a + b minutes")):
            a, b = fit(xs, ys, form)
            m = minutes_to(a, b, target, max(xs), form)
            row["fits"][form] = {"a": round(a, 4), "b": round(b, 6), "form": text,
                                 "predicted_minutes": None if m is None else round(m)}
        out.append(row)
    return out


def tables(pts: list[dict], pred: list[dict]) -> str:
    lines = ["| Tiny CPU-min | steps | tiny-val default | tiny-val φ mid | nette-val default | "
             "nette-val φ mid | weights |", "|---|---|---|---|---|---|---|"]
    for p in pts:
        t, n = p["knn"].get("tiny", {}), p["knn"].get("imagenette", {})
        lines.append(f"| {p['minutes']:g} | {p['steps']:,} | {t.get('phi', math.nan):.3f} | "
                     f"{t.get('phi_mid_raw', math.nan):.3f} | {n.get('phi', math.nan):.3f} | "
                     f"{n.get('phi_mid_raw', math.nan):.3f} | {p['note']} |")
    if pts:
        t, n = pts[-1]["knn"].get("tiny", {}), pts[-1]["knn"].get("imagenette", {})
        lines.append(f"| untrained, same code | | {t.get('random_init', math.nan):.3f} | "
                     f"{t.get('random_init_mid_raw', math.nan):.3f} | "
                     f"{n.get('random_init', math.nan):.3f} | "
                     f"{n.get('random_init_mid_raw', math.nan):.3f} | |")
        lines.append(f"| 16x16 pixels | | {t.get('pixels16', math.nan):.3f} | "
                     f"{t.get('pixels16', math.nan):.3f} | {n.get('pixels16', math.nan):.3f} | "
                     f"{n.get('pixels16', math.nan):.3f} | |")
    lines += ["", "| bar (on validation) | target | latest | Tiny CPU-minutes to reach it: "
              "slowing fit a + b ln(1 + m/30) | steady fit a + b m |", "|---|---|---|---|---|"]

    def when(r: dict, form: str) -> str:
        m = r["fits"][form]["predicted_minutes"]
        return "met" if r["met"] else ("not at this rate" if m is None else f"{m:,}")
    for r in pred:
        lines.append(f"| {r['bar']} | {r['target_val']:.3f} | {r['latest']:.3f} | "
                     f"{when(r, 'log')} | {when(r, 'linear')} |")
    return "\n".join(lines)


def plot(pts: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, s, title in zip(axes, ("tiny", "imagenette"),
                            ("Tiny ImageNet val (201 classes)", "Imagenette val (unseen)")):
        have = [p for p in pts if s in p["knn"]]
        if not have:
            continue
        xs = [p["minutes"] for p in have]
        grid = np.linspace(0, max(xs) * 1.5, 100)
        for rep, color, name in (("phi", "tab:blue", "default readout"),
                                 ("phi_mid_raw", "tab:orange", "paper's φ (mid)")):
            ys = [p["knn"][s][rep] for p in have]
            ax.plot(xs, ys, "o", color=color, label=name)
            a, b = fit(xs, ys)
            ax.plot(grid, a + b * np.log1p(grid / SCALE), "-", color=color, lw=0.8)
            ax.axhline(have[-1]["knn"][s][UNTRAINED[rep]], color=color, ls=":", lw=0.8)
        ax.axhline(have[-1]["knn"][s]["pixels16"], color="gray", ls="-.", lw=0.8)
        ax.set(xlabel="Tiny ImageNet training, CPU-minutes", ylabel="kNN@10", title=title)
        ax.legend(fontsize=7)
    fig.suptitle("dotted: the same network untrained; gray: 16x16 pixels; lines: the fits",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--png", type=Path, default=None, help="also draw the curve here")
    ap.add_argument("--out", type=Path, default=RESULTS / "tiny_curve.json")
    a = ap.parse_args()
    pts = points()
    pred = predict(pts)
    a.out.write_text(json.dumps(
        {"how": __doc__.split("\n\n")[1].replace("\n", " "), "points": pts, "bars": pred},
        indent=1, ensure_ascii=False) + "\n")
    if a.png:
        plot(pts, a.png)
    print(tables(pts, pred))


if __name__ == "__main__":
    main()
