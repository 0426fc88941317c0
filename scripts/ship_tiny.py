"""Evaluate a Tiny ImageNet training run's weights and ship them as the built-in `small64` when
they qualify (issue 26's rule). Every step is a command that could be run by hand:

 1. snapshot RUN/{model,ema}.safetensors into runs/ship/ (the run keeps training);
 2. bench/recipe_score.py rows for the snapshot and the shipped weights on the four protocols of
    bench/protocols.py (tiny-val, imagenette-val: validation; tiny-test, imagenette-test: test),
    the default readout's whitening fitted on each gallery for both -> bench/results/
    recipe_ship.json (--reference names a row already there to judge against instead of
    scoring the shipped file again; --rule-readout the readout both rows use);
 3. the rule: ship when Tiny ImageNet validation kNN@10 rises for the default readout or the
    paper's φ, and no test kNN@10 of either falls by more than the noise of its queries (one
    binomial standard error at p = 0.5: 0.011 for 2,010 Tiny queries, 0.016 for 1,000 Imagenette);
 4. idx fit-readout on Tiny ImageNet training images (the first 10,050 in shard order; K = 256
    default, 128 beside it);
 5. idx denoise-eval on 1,000 Tiny ImageNet val and 1,000 Imagenette test images;
 6. checkpoint.ship: fp16 copy into indexer/model/checkpoints/small64.*;
 7. idx eval --sigmas '' of the shipped file on tiny-test and imagenette-test ->
    bench/results/eval_small64_tiny.{json,md} and eval_small64.{json,md}, summarized in its JSON.

    OMP_NUM_THREADS=1 python scripts/ship_tiny.py --run runs/tiny-warm --weights ema [--dry-run]

It replaced scripts/ship_small64.py, which shipped the Imagenette-only checkpoints up to 21,919
steps under issue 18's rule (its recorded decisions stay in bench/results/draws_sweep_*.json and
the model card; the script is in git history, `git show f570ac8:scripts/ship_small64.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from protocols import PROTOCOLS, TINY, TINY_TRAIN, cli_args

RESULTS = REPO / "bench" / "results"
IDX = [str(Path(sys.executable).parent / "idx")]   # the environment's own CLI
NOISE = {"tiny": 0.011, "imagenette": 0.016}
# The default readout; K = 256 since the 69,079-step model's validation sweep
# (bench/k_sweep.py -> bench/results/k_sweep_69079.json); K = 128 is fitted beside it.
READOUT = "blocks+white256+l2"
BESIDE = "blocks+white128+l2"


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


def scored_row(rows: list[dict], sha12: str, readout: str = READOUT) -> dict | None:
    """A row of recipe_ship.json already scored for these weights with this readout (rows
    written before the K = 256 switch carry no "readout" and were scored with K = 128)."""
    return next((r for r in rows if r["model_sha256"] == sha12
                 and r.get("readout", BESIDE) == readout), None)


def decide(old: dict, new: dict, readout: str = READOUT) -> tuple[bool, list[str]]:
    """The rule on two recipe_score rows scored with `readout`; returns (ship?, one line per set
    and readout)."""
    lines, rises, falls = [], False, False
    for s in ("tiny", "imagenette"):
        for rep, name in (("phi", readout), ("phi_mid_raw", "mid")):
            v0, v1 = old["knn@10"][f"{s}-val"][rep], new["knn@10"][f"{s}-val"][rep]
            t0, t1 = old["knn@10"][f"{s}-test"][rep], new["knn@10"][f"{s}-test"][rep]
            rises |= s == "tiny" and v1 > v0
            falls |= round(t1 - t0, 9) < -NOISE[s]   # kNN@10 are counts / queries: no float dust
            lines.append(f"{s} {name}: val {v0:.3f} -> {v1:.3f} ({v1 - v0:+.3f}), "
                         f"test {t0:.3f} -> {t1:.3f} ({t1 - t0:+.3f}, noise {NOISE[s]})")
    return rises and not falls, lines


def cpu_minutes(prev: dict, info: dict, origin: float | None) -> dict:
    """The training compute behind the weights: the Imagenette record small64 carried before
    its first Tiny ImageNet ship, plus this run's process CPU time since its warm start
    (`origin`: the train_cpu_seconds it started from, for runs that do not record it)."""
    import recipe_score as rs

    if origin is None and not isinstance(info.get("warm_start_from"), dict):
        raise SystemExit("the run does not record its warm start: pass --origin-cpu-seconds "
                         "(the train_cpu_seconds of the checkpoint its Tiny training began from)")
    before = prev.get("cpu_minutes", {})
    before = before.get("imagenette", before)
    tiny = rs.arm_cpu_minutes(info, origin)
    return {"imagenette": before, "tiny imagenet": tiny,
            "total": round(before.get("total", 0) + tiny, 1),
            "how": "tiny imagenet: the run's train_cpu_seconds (process CPU time inside the "
                   "steps, all threads) less that of the checkpoint it warm-started from; "
                   "imagenette: small64's record before"}


def eval_summary(ev: dict, where: str) -> dict:
    reps = ev["representations"]
    keys = ("phi", "phi_mid_raw", "pixels", "pixels16", "random_init", "random_init_mid_raw")
    return {"queries": ev["settings"]["queries"]["count"],
            "gallery": ev["settings"]["gallery"]["count"], "readout": ev["readout"],
            "knn@10": {k: round(reps[k]["knn@10"], 3) for k in keys},
            "nmi": {k: round(reps[k]["nmi"], 4) for k in keys},
            "weights_evaluated": f"shipped fp16 file sha256 {ev['model_sha256'][:12]} ({where})"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--weights", choices=("model", "ema"), default="ema")
    ap.add_argument("--ship-dir", type=Path, default=REPO / "runs" / "ship")
    ap.add_argument("--cache", type=Path, default=REPO / "runs" / "evalcache")
    ap.add_argument("--train-note", required=True, help="how the run was trained (recorded)")
    ap.add_argument("--origin-cpu-seconds", type=float, default=None,
                    help="train_cpu_seconds of the checkpoint the run's Tiny ImageNet training "
                         "began from (runs that do not record `warm_start_from`)")
    ap.add_argument("--reference", metavar="SHA12", default=None,
                    help="judge the rule against this recipe_ship.json row instead of scoring the "
                         "shipped file: the shipped weights' own row before their fp16 copy "
                         "(saves scoring the shipped model again, about half the script's time)")
    ap.add_argument("--rule-readout", default=READOUT,
                    help="the readout both rows of the rule are scored with (a --reference row "
                         f"from before the K = 256 switch: {BESIDE}); the shipped default stays "
                         f"{READOUT}")
    ap.add_argument("--dry-run", action="store_true", help="stop after the decision")
    ap.add_argument("--force", action="store_true", help="ship even if the rule says no")
    a = ap.parse_args()
    import recipe_score as rs
    from phisearch.indexer.model import checkpoint as ckpt

    shipped = ckpt.load("small64")
    snap, step = snapshot(a.run, a.ship_dir, a.weights)
    print(f"snapshot: {snap} ({step} steps); shipped: {shipped.info['steps']} steps")
    evidence = RESULTS / "recipe_ship.json"
    doc = json.loads(evidence.read_text()) if evidence.is_file() else {"rows": []}
    protos = ["tiny-val", "imagenette-val", "tiny-test", "imagenette-test"]
    images = rs.psnr_images()
    rows = {}
    if a.reference:
        rows["shipped"] = scored_row(doc["rows"], a.reference, a.rule_readout)
        if rows["shipped"] is None:
            raise SystemExit(f"{evidence}: no row {a.reference} scored with {a.rule_readout}")
        print(f"reference: the row of {rows['shipped']['model_sha256']} "
              f"({rows['shipped']['steps']} steps, {a.rule_readout})")
    for label, path in (("shipped", ckpt.resolve("small64")), ("candidate", snap)):
        if label in rows:
            continue
        sha = ckpt.load(path).sha256[:12]
        row = scored_row(doc["rows"], sha, a.rule_readout)
        if row is None:
            row = dict(arm=label, weights=a.weights if label == "candidate" else "fixed",
                       **rs.score(path, protos, str(a.cache), images, readout=a.rule_readout))
            doc["rows"].append(row)
            evidence.write_text(json.dumps(doc, indent=1) + "\n")
        rows[label] = row
    ok, lines = decide(rows["shipped"], rows["candidate"], a.rule_readout)
    print("\n".join(lines))
    print("decision:", "ship" if ok else "keep the shipped weights")
    if a.dry_run or not (ok or a.force):
        return

    fitted = a.ship_dir / f"{snap.stem}-fitted.safetensors"
    fitted.unlink(missing_ok=True)
    run([*IDX, "fit-readout", "--checkpoint", str(snap), "--data", TINY_TRAIN, "--l2",
         "--limit", "10050", "--dims", "256", "--dims", "128", "--out", str(fitted)])
    tiny_val = str(TINY / "tinyimagenet-val-{000000..000010}.tar.gz")
    de_tiny, de_nette = RESULTS / "denoise_eval_small64_tiny.json", \
        RESULTS / "denoise_eval_small64.json"
    run([*IDX, "denoise-eval", "--checkpoint", str(fitted), "--data", tiny_val,
         "--images", "1000", "--json"], stdout=de_tiny)
    run([*IDX, "denoise-eval", "--checkpoint", str(fitted), "--data",
         PROTOCOLS["imagenette-test"][0], "--images", "1000", "--json"], stdout=de_nette)
    c = ckpt.load(fitted)
    if c.info.get("readout") != READOUT:
        raise SystemExit(f"fit-readout made {c.info.get('readout')}, not {READOUT}")
    prev = shipped.info
    c.info.update(
        denoise_eval={"data": "imagenette-test-000000.tar (1000 images)",
                      "sigmas": json.loads(de_nette.read_text())["sigmas"]},
        denoise_eval_tiny={"data": "tinyimagenet-val, first 1000 images",
                           "sigmas": json.loads(de_tiny.read_text())["sigmas"]},
        phi_defaults=prev["phi_defaults"],
        warm_start={"from": f"small64 sha256 {prev['weights_sha256'][:12]} "
                            f"({prev['steps']:,} steps)", "note": a.train_note},
        readout_fitted_on="tinyimagenet-train, first 10,050 images in shard order",
        cpu_minutes=cpu_minutes(prev, c.info, a.origin_cpu_seconds),
        ship_decision={"rule": "Tiny ImageNet validation kNN@10 up for the default readout or "
                               "mid; no test kNN@10 of either, on either set, down by more than "
                               f"its noise {NOISE}", "evidence": "bench/results/recipe_ship.json",
                       "readout": a.rule_readout,
                       "against": f"model_sha256 {rows['shipped']['model_sha256']} "
                                  f"({rows['shipped']['steps']} steps)",
                       "lines": lines})
    ckpt.save(c.model, fitted, c.info, extras=c.extras)
    ckpt.ship(fitted, "small64")

    out = ckpt.BUILTIN_DIR / "small64.json"
    info = json.loads(out.read_text())
    for proto, name in (("tiny-test", "eval_small64_tiny"), ("imagenette-test", "eval_small64")):
        ev_json = RESULTS / f"{name}.json"
        run([*IDX, "eval", "--checkpoint", "small64", *cli_args(proto), "--sigmas", "",
             "--readouts", f"mid,{READOUT},{BESIDE}", "--cache", str(a.cache),
             "--out", str(ev_json), "--markdown", str(ev_json.with_suffix(".md"))])
        key = "eval_tiny" if proto == "tiny-test" else "eval"
        info[key] = eval_summary(json.loads(ev_json.read_text()), f"bench/results/{name}.json")
        info[key]["protocol"] = " ".join(cli_args(proto)).replace(str(REPO.parent), "..")
    out.write_text(json.dumps(info, indent=1, sort_keys=True))
    print(f"shipped small64 at {step} steps: sha256 {info['weights_sha256'][:12]}; "
          f"Tiny kNN@10 {info['eval_tiny']['knn@10']}; Imagenette {info['eval']['knn@10']}")


if __name__ == "__main__":
    main()
