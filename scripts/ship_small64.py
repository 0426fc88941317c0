"""Evaluate the latest weights of a training run and ship them as the built-in `small64` when
they qualify (issue 18's rule). Every step is a command that could be run by hand:

 1. snapshot RUN/model.safetensors (+ .json) into runs/ship/small64-STEP.* (the run keeps training);
 2. bench/draws_sweep.py: the snapshot, the shipped weights and the untrained network on the same
    images, σ 0.2, 1-4 draws, test (test-000000) and validation (test-000001) queries against
    train 0-4 -> bench/results/draws_sweep_STEP.json;
 3. the rule: ship when validation kNN@10 rises for the default readout or the paper's φ, and
    no test kNN@10 of either falls by more than the noise of 1,000 queries (0.016);
 4. idx fit-readout: the whitenings of the default readout and of white256 (σ 0.2, 4 draws,
    train 0-4), fitted for these weights;
 5. idx denoise-eval on 1,000 test images;
 6. checkpoint.ship: fp16 copy into indexer/model/checkpoints/small64.*;
 7. idx eval of the shipped file -> bench/results/eval_small64.{json,md}, summarized in its JSON.

    python scripts/ship_small64.py --run runs/small64 [--dry-run] [--force]

--dry-run stops after the decision. Threads: OMP_NUM_THREADS (1 beside a training run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DATA = Path(os.environ.get("PHISEARCH_DATA", REPO.parent / "shared" / "data")) / "imagenette-64"
QUERIES = str(DATA / "imagenette-test-000000.tar")
VAL = str(DATA / "imagenette-test-000001.tar")
GALLERY = str(DATA / "imagenette-train-{000000..000004}.tar")
NOISE = 0.016          # ± of kNN@10 on 1,000 queries (binomial, p ≈ 0.5: 1.0 standard error)
IDX = [str(Path(sys.executable).parent / "idx")]   # the environment's own CLI


def run(cmd: list[str], stdout: Path | None = None) -> None:
    """Print and run one step; its standard output goes to `stdout` when given."""
    print("$", " ".join(cmd), flush=True)
    with open(stdout, "w") if stdout else contextlib.nullcontext() as out:
        subprocess.run(cmd, check=True, cwd=REPO, stdout=out)


def snapshot(run_dir: Path, dst_dir: Path, weights: str = "model") -> tuple[Path, int]:
    """Copy the run's weights (model, or ema: their moving average) and record; refuse a pair
    written by two different saves."""
    from phisearch.indexer.model import checkpoint as ckpt
    info = json.loads((run_dir / f"{weights}.json").read_text())
    step = int(info["steps"])
    dst = dst_dir / f"small64-{step}{'-ema' if weights == 'ema' else ''}.safetensors"
    dst_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(run_dir / f"{weights}.safetensors", dst)
    shutil.copy2(run_dir / f"{weights}.json", dst.with_suffix(".json"))
    c = ckpt.load(dst)
    if c.sha256 != c.info.get("weights_sha256"):
        raise SystemExit(f"{run_dir}: weights and record come from two saves; run again")
    return dst, step


def rows_of(sweep: dict, net_prefix: str) -> list[dict]:
    """The sweep's rows at the shipped φ settings (σ 0.2, 4 draws) of the net labelled so."""
    return [r for r in sweep["rows"] if r["net"].startswith(net_prefix) and r["draws"] == 4
            and r["sigma"] == 0.2]


def knn10(sweep: dict, net_prefix: str, readout: str) -> dict[str, float]:
    """{'test': .., 'val': ..} kNN@10 of one readout of the net labelled so."""
    for r in rows_of(sweep, net_prefix):
        if r["readout"] == readout:
            return {"test": r["test"]["knn@10"], "val": r["val"]["knn@10"]}
    raise KeyError((net_prefix, readout))


def decide(sweep: dict, new: str, default_readout: str) -> tuple[bool, list[str]]:
    """The shipping rule; returns (ship?, one line per readout)."""
    lines, rises, falls = [], False, False
    for readout in ("mid", default_readout):
        old, cand = knn10(sweep, "small64 (", readout), knn10(sweep, new, readout)
        d_val, d_test = cand["val"] - old["val"], cand["test"] - old["test"]
        rises |= d_val > 0
        falls |= d_test < -NOISE
        lines.append(f"{readout}: val {old['val']:.3f} -> {cand['val']:.3f} ({d_val:+.3f}), "
                     f"test {old['test']:.3f} -> {cand['test']:.3f} ({d_test:+.3f})")
    return rises and not falls, lines


def best_on_val(sweep: dict, net_prefix: str) -> str:
    """The blocks+whiteK+l2 readout with the best validation kNN@10."""
    rows = [r for r in rows_of(sweep, net_prefix)
            if re.fullmatch(r"blocks\+white\d+\+l2", r["readout"])]
    return max(rows, key=lambda r: r["val"]["knn@10"])["readout"]


def eval_summary(ev: dict) -> dict:
    """The checkpoint JSON's `eval` record from `idx eval --json`."""
    reps = ev["representations"]
    keys = ("phi", "phi_mid_raw", "pixels", "pixels16", "random_init", "random_init_mid_raw")
    return {"gallery": "imagenette-train-{000000..000004}.tar",
            "queries": "imagenette-test-000000.tar", "readout": ev["readout"],
            "knn@10": {k: round(reps[k]["knn@10"], 3) for k in keys},
            "nmi": {k: round(reps[k]["nmi"], 4) for k in keys},
            "weights_evaluated": f"shipped fp16 file sha256 {ev['model_sha256'][:12]} "
                                 "(bench/results/eval_small64.json)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "small64")
    ap.add_argument("--ship-dir", type=Path, default=REPO / "runs" / "ship")
    ap.add_argument("--cache", type=Path, default=REPO / "runs" / "evalcache")
    ap.add_argument("--weights", choices=("model", "ema"), default="model",
                    help="the run's last weights, or their moving average (idx train --ema)")
    ap.add_argument("--train-note", default="warm-started from the shipped fp16 weights (Adam "
                    "restarted), then resumed in one run folder with its Adam state; lr 1e-4 "
                    "constant, sigma-dist paper",
                    help="how the run was trained, for the checkpoint's warm_start record")
    ap.add_argument("--dry-run", action="store_true", help="stop after the decision")
    ap.add_argument("--force", action="store_true", help="ship even if the rule says no")
    a = ap.parse_args()
    from phisearch.indexer.model import checkpoint as ckpt
    from phisearch.indexer.model.readout import parse_label

    shipped = ckpt.load("small64")
    default_readout = shipped.info["readout"]
    snap, step = snapshot(a.run, a.ship_dir, a.weights)
    print(f"snapshot: {snap} ({step} steps); shipped: {shipped.info['steps']} steps")
    sweep_path = RESULTS / f"draws_sweep_{snap.stem.removeprefix('small64-')}.json"
    both = RESULTS / f"draws_sweep_{step}.json"   # the step's sweep may hold the average too
    if not sweep_path.exists() and both.exists() and \
            rows_of(json.loads(both.read_text()), snap.stem + " ("):
        sweep_path = both
    if not sweep_path.exists():
        run([sys.executable, "bench/draws_sweep.py", "--checkpoint", "small64", "--checkpoint",
             str(snap), "--sigmas", "0.2", "--max-draws", "4", "--cache", str(a.cache),
             "--out", str(sweep_path)])
    sweep = json.loads(sweep_path.read_text())
    ok, lines = decide(sweep, snap.stem + " (", default_readout)
    best = best_on_val(sweep, snap.stem + " (")
    if best != default_readout:   # the rule keeps the readout; a change is a decision for a person
        print(f"note: validation prefers {best} for these weights, not {default_readout}")
    print("\n".join(lines))
    print("decision:", "ship" if ok else "keep the shipped weights")
    if a.dry_run or not (ok or a.force):
        return

    fitted = a.ship_dir / f"{snap.stem}-fitted.safetensors"
    fitted.unlink(missing_ok=True)
    k = parse_label(default_readout).white                # the first --dims is the default
    dims = [k] + [256] * (k != 256)
    run([*IDX, "fit-readout", "--checkpoint", str(snap), "--data", GALLERY, "--l2",
         *[x for d in dims for x in ("--dims", str(d))], "--out", str(fitted)])
    denoise = RESULTS / "denoise_eval_small64.json"
    run([*IDX, "denoise-eval", "--checkpoint", str(fitted), "--data", QUERIES,
         "--images", "1000", "--json"], stdout=denoise)

    c = ckpt.load(fitted)
    if c.info.get("readout") != default_readout:
        raise SystemExit(f"fit-readout made {c.info.get('readout')}, not {default_readout}")
    de = json.loads(denoise.read_text())
    prev = shipped.info
    c.info.update(
        denoise_eval={"data": "imagenette-test-000000.tar (1000 images)", "sigmas": de["sigmas"]},
        phi_defaults=prev["phi_defaults"],
        warm_start={"from": f"small64 sha256 {prev['weights_sha256'][:12]} "
                            f"({prev['steps']:,} steps)",
                    "note": a.train_note},
        ship_decision={"rule": f"validation kNN@10 up for {default_readout} or mid, no test "
                               f"kNN@10 down by more than {NOISE}",
                       "evidence": f"bench/results/{sweep_path.name}", "lines": lines})
    ckpt.save(c.model, fitted, c.info, extras=c.extras)
    ckpt.ship(fitted, "small64")

    ev_json = RESULTS / "eval_small64.json"
    run([*IDX, "eval", "--checkpoint", "small64", "--queries", QUERIES, "--gallery", GALLERY,
         "--readouts", f"mid,{default_readout},blocks+white256+l2", "--cache", str(a.cache),
         "--out", str(ev_json), "--markdown", str(ev_json.with_suffix(".md"))])
    out = ckpt.BUILTIN_DIR / "small64.json"
    info = json.loads(out.read_text())
    info["eval"] = eval_summary(json.loads(ev_json.read_text()))
    info["eval"]["readout_chosen_on"] = (f"validation queries imagenette-test-000001.tar "
                                         f"(bench/results/{sweep_path.name})")
    info["shipped_from"] = str(fitted.relative_to(REPO)) if fitted.is_relative_to(REPO) \
        else str(fitted)
    out.write_text(json.dumps(info, indent=1, sort_keys=True))
    print(f"shipped small64 at {step} steps: sha256 {info['weights_sha256'][:12]}; "
          f"kNN@10 {info['eval']['knn@10']}")


if __name__ == "__main__":
    main()
