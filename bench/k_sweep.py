"""Whitening size K of the default readout (`blocks+whiteK+l2`), chosen on validation.

The shipped small64's default is K = 128, chosen on Imagenette validation when the model had only
seen Imagenette; since the Tiny ImageNet models, K = 256 has been ahead on both *test* sets, which
must not decide it. This fits every K from one pass, as the ship does (`idx fit-readout` on the
first 10,050 Tiny ImageNet training images in shard order, σ 0.2, 4 draws, into a copy of the
checkpoint: the weights and so the eval cache keys are the same), then scores each readout with
`idx eval --sigmas ''` on the four protocols of bench/protocols.py. Validation decides; test is
reported.

    OMP_NUM_THREADS=1 python bench/k_sweep.py --checkpoint small64 --cache runs/evalcache

Writes bench/results/k_sweep_<steps>.json and prints a markdown table (kNN@10, validation first).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from protocols import TINY_TRAIN, cli_args

IDX = str(Path(sys.executable).parent / "idx")
PROTOS = ("tiny-val", "imagenette-val", "tiny-test", "imagenette-test")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="small64")
    p.add_argument("--dims", default="64,96,128,192,256,384")
    p.add_argument("--fit-images", type=int, default=10050)
    p.add_argument("--cache", default="runs/evalcache")
    p.add_argument("--work", default="runs/ksweep", help="where the checkpoint copy goes")
    a = p.parse_args()

    from phisearch.indexer.model import checkpoint as ckpt
    src = ckpt.resolve(a.checkpoint)
    steps = json.loads(src.with_suffix(".json").read_text()).get("steps", 0)
    dims = [int(d) for d in a.dims.split(",")]
    work = REPO / a.work
    work.mkdir(parents=True, exist_ok=True)
    fitted = work / f"{src.stem}-{steps}-k{'_'.join(map(str, dims))}.safetensors"
    if not fitted.exists():
        cmd = [IDX, "fit-readout", "--checkpoint", str(src), "--data", TINY_TRAIN,
               "--limit", str(a.fit_images), "--l2", "--no-default", "--out", str(fitted)]
        for d in dims:
            cmd += ["--dims", str(d)]
        subprocess.run(cmd, check=True, cwd=REPO)
    readouts = ["mid"] + [f"blocks+white{d}+l2" for d in dims]   # rows: phi_<readout>
    rows: dict[str, dict] = {}
    for proto in PROTOS:
        out = work / f"eval_{proto}_{steps}.json"
        if not out.exists():
            subprocess.run([IDX, "eval", "--checkpoint", str(fitted), *cli_args(proto),
                            "--sigmas", "", "--readouts", ",".join(readouts),
                            "--cache", a.cache, "--out", str(out)],
                           check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        rows[proto] = json.loads(out.read_text())
    table = {proto: {name.removeprefix("phi_"): round(m["knn@10"], 4)
                     for name, m in ev["representations"].items() if "knn@10" in m}
             for proto, ev in rows.items()}
    result = {"checkpoint": str(src.relative_to(REPO)) if src.is_relative_to(REPO) else str(src),
              "steps": steps, "fitted_on": f"{TINY_TRAIN} (first {a.fit_images} in shard order)",
              "sigma": 0.2, "draws": 4, "dims": dims, "knn@10": table,
              "choice_by": "mean of tiny-val and imagenette-val kNN@10 of blocks+whiteK+l2"}
    trained = [f"blocks+white{d}+l2" for d in dims]
    score = {r: (table["tiny-val"][r] + table["imagenette-val"][r]) / 2 for r in trained}
    result["best_on_validation"] = max(score, key=score.get)
    dst = REPO / "bench" / "results" / f"k_sweep_{steps}.json"
    dst.write_text(json.dumps(result, indent=1))
    print("| readout | " + " | ".join(PROTOS) + " |\n|---|" + "---|" * len(PROTOS))
    for name in table["tiny-val"]:
        print(f"| {name} | " + " | ".join(f"{table[p].get(name, float('nan')):.3f}"
                                          for p in PROTOS) + " |")
    print(f"best on validation: {result['best_on_validation']} -> {dst.relative_to(REPO)}")


if __name__ == "__main__":
    main()
