"""Score training arms side by side (issue 26, part 3): each recipe decision is a pair of runs at
equal CPU-minutes, judged on the validation protocols of both sets (bench/protocols.py).

For every arm (a run folder of `idx train`) and weights (the last, and the moving average when
the run keeps one), the current checkpoint is copied to runs/snapshots/ (so the row names fixed
weights), then scored:
- kNN@10 of the default readout `blocks+white128+l2` (whitening fitted on each gallery, for every
  network alike) and of the paper's φ (`mid`, raw), on tiny-val and imagenette-val, with the
  untrained network and 16x16 pixels beside them (the same code and images);
- PSNR of the denoiser at σ 0.1 on 512 Tiny ImageNet validation-subset images and on 512
  Imagenette test-000001 images;
- the arm's CPU-minutes since it started (process CPU time inside the steps, `cpu_minutes`).

    OMP_NUM_THREADS=1 python bench/recipe_score.py --name warm_vs_scratch \
        --arm warm=runs/tiny-warm --arm scratch=runs/tiny-scratch --cache runs/evalcache

Rows are appended to bench/results/recipe_NAME.json (one per arm, weights and step), so
repeated calls build the arms' learning curves; a markdown table of all rows is printed.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocols import NETTE, PROTOCOLS, REPO  # noqa: E402

from phisearch.indexer.model import checkpoint as ckpt  # noqa: E402
from phisearch.indexer.train.denoise_eval import denoise_eval  # noqa: E402
from phisearch.indexer.train.loop import load_images  # noqa: E402
from phisearch.search.evaluate import EvalSettings, evaluate, load_split  # noqa: E402

READOUT = "blocks+white128+l2"
KEEP = ("phi", "phi_mid_raw", "random_init", "random_init_mid_raw", "pixels16")


def arm_cpu_minutes(info: dict, origin_cpu_seconds: float | None = None) -> float:
    """CPU-minutes of this run alone: its CPU time less what it started from: `origin` when
    given, else the warm start the run records (`warm_start_from`, kept across resumes), else the
    checkpoint its first launch names (runs from before that record: only until a resume)."""
    start = origin_cpu_seconds
    if start is None and isinstance(info.get("warm_start_from"), dict):
        start = info["warm_start_from"]["cpu_seconds"]
    if start is None:
        init = (info.get("train") or {}).get("init_from")
        start = ckpt.load(init).info.get("train_cpu_seconds", 0.0) if init else 0.0
    return round((info.get("train_cpu_seconds", 0.0) - start) / 60, 1)


def snapshot(run: Path, weights: str) -> Path | None:
    """A fixed copy of the run's current weights (model or ema) under runs/snapshots/."""
    src = run / ("model.safetensors" if weights == "last" else "ema.safetensors")
    if not src.is_file():
        return None
    info = json.loads(src.with_suffix(".json").read_text())
    dst = REPO / "runs" / "snapshots" / f"{run.name}-{info['steps']}-{weights}.safetensors"
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src.with_suffix(".json"), dst.with_suffix(".json.tmp"))
        shutil.copy(src, dst.with_suffix(".tmp"))
        dst.with_suffix(".json.tmp").rename(dst.with_suffix(".json"))
        dst.with_suffix(".tmp").rename(dst)
    return dst


def psnr_images() -> dict[str, object]:
    tiny_q, tiny_v, sel = PROTOCOLS["tiny-val"]
    tiny = load_split(tiny_q, 512, sel["queries_per_class"], sel["queries_skip_per_class"])[0]
    nette = load_images([str(NETTE / "imagenette-test-000001.tar")], 512)
    return {"tiny-val": tiny, "imagenette-val": nette}


def score(path: Path, protocols: list[str], cache: str | None, images: dict,
          origin_cpu_seconds: float | None = None, readout: str = READOUT) -> dict:
    """One checkpoint's row. `origin_cpu_seconds`: the arm's CPU-minutes count from there (a
    branch of another run's folder, Adam state and all), else from its warm start. `readout`:
    the whitened readout scored as "phi" (fitted on each gallery)."""
    c = ckpt.load(path)
    cpu = arm_cpu_minutes(c.info, origin_cpu_seconds)
    row: dict = {"checkpoint": str(path.relative_to(REPO)), "steps": c.info.get("steps"),
                 "epochs": c.info.get("epochs"), "cpu_minutes": cpu,
                 "model_sha256": c.sha256[:12], "readout": readout, "knn@10": {}, "nmi": {},
                 "psnr_0.1": {}}
    for name in protocols:
        queries, gallery, sel = PROTOCOLS[name]
        st = EvalSettings(sigma=0.2, draws=4, readouts=("mid", readout), refit_whitening=True,
                          cache_dir=cache, **sel)
        r = evaluate(c, queries, gallery, readout, st)
        row["knn@10"][name] = {k: r["representations"][k]["knn@10"] for k in KEEP}
        row["nmi"][name] = {k: r["representations"][k]["nmi"] for k in KEEP}
    for name, imgs in images.items():
        row["psnr_0.1"][name] = denoise_eval(c.model.eval(), imgs, sigmas=(0.1,))["0.1"]["denoised"]
    return row


def table(rows: list[dict]) -> str:
    out = ["| arm | weights | steps | CPU-min | tiny-val default | tiny-val φ mid | "
           "nette-val default | nette-val φ mid | PSNR σ0.1 tiny / nette |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = r["knn@10"]
        t, n = k.get("tiny-val", {}), k.get("imagenette-val", {})
        cpu = "" if r["cpu_minutes"] is None else r["cpu_minutes"]
        out.append(f"| {r['arm']} | {r['weights']} | {r['steps']} | {cpu} | "
                   f"{t.get('phi', float('nan')):.3f} | {t.get('phi_mid_raw', float('nan')):.3f} | "
                   f"{n.get('phi', float('nan')):.3f} | {n.get('phi_mid_raw', float('nan')):.3f} | "
                   f"{r['psnr_0.1'].get('tiny-val', 0):.2f} / "
                   f"{r['psnr_0.1'].get('imagenette-val', 0):.2f} |")
    base = next((r for r in rows if "tiny-val" in r["knn@10"]), None)
    if base:
        t = base["knn@10"]["tiny-val"]
        n = base["knn@10"].get("imagenette-val", {})
        out.append(f"| untrained, same code | | | | {t['random_init']:.3f} | "
                   f"{t['random_init_mid_raw']:.3f} | {n.get('random_init', float('nan')):.3f} | "
                   f"{n.get('random_init_mid_raw', float('nan')):.3f} | |")
        out.append(f"| 16x16 pixels | | | | {t['pixels16']:.3f} | {t['pixels16']:.3f} | "
                   f"{n.get('pixels16', float('nan')):.3f} | {n.get('pixels16', float('nan')):.3f} | |")
    return "\n".join(out)


def add_row(out: Path, row: dict) -> dict:
    """Add (or replace, by checkpoint) one row of OUT under an exclusive lock, reading the file
    afresh: arms scored by parallel processes under one --name each keep their rows."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = json.loads(out.read_text()) if out.is_file() else {"rows": []}
        doc["rows"] = [r for r in doc["rows"] if r["checkpoint"] != row["checkpoint"]] + [row]
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(out)
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True, help="bench/results/recipe_NAME.json")
    ap.add_argument("--arm", action="append", default=[],
                    help="LABEL=RUN_FOLDER[@CPU_SECONDS] (repeatable; @: CPU-minutes count from "
                         "that train_cpu_seconds, the branch point of a copied run folder)")
    ap.add_argument("--checkpoint", action="append", default=[],
                    help="LABEL=CHECKPOINT: a fixed checkpoint scored as a reference row")
    ap.add_argument("--weights", default="both", choices=("last", "ema", "both"))
    ap.add_argument("--protocols", default="tiny-val,imagenette-val")
    ap.add_argument("--cache", default=str(REPO / "runs" / "evalcache"))
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    out = REPO / "bench" / "results" / f"recipe_{args.name}.json"
    doc = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    if not args.table_only:
        images = psnr_images()
        todo: list[tuple[str, str, Path, float | None]] = []
        for spec in args.arm:
            label, run = spec.split("=", 1)
            run, _, origin = run.partition("@")
            for w in (("last", "ema") if args.weights == "both" else (args.weights,)):
                snap = snapshot(Path(run), w)
                if snap is not None:
                    todo.append((label, w, snap, float(origin) if origin else None))
        for spec in args.checkpoint:
            label, path = spec.split("=", 1)
            todo.append((label, "fixed", ckpt.resolve(path), None))   # not an arm's minutes
        for label, w, path, origin in todo:
            t0 = time.perf_counter()
            row = dict(arm=label, weights=w, **score(path, args.protocols.split(","),
                                                     args.cache, images, origin))
            if w == "fixed":
                row["cpu_minutes"] = None
            row["seconds"] = round(time.perf_counter() - t0, 1)
            row["torch_threads"] = torch.get_num_threads()
            doc = add_row(out, row)
            print(f"scored {row['checkpoint']} in {row['seconds']} s", file=sys.stderr)
    print(table(doc["rows"]))


if __name__ == "__main__":
    main()
