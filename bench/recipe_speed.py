"""CPU cost of a training step by resolution and batch size (issue 26, decisions 4 and 5): how many
images a CPU-minute buys at 32x32 vs 64x64 and at batch 16 / 32 / 64, so the arms of those decisions
can be planned at equal CPU-minutes (steps are what a run is told; CPU time is what it is judged by).

One thread, eager (the trainer compiles runs of 10+ minutes), in the step mode the trainer's probe
picks on this host (`--dtype auto`; bf16 autocast + channels_last on an AVX-512-bf16 CPU), the step
the trainer runs: augmentation, area downscale, forward, backward, Adam, moving average.
Settings are interleaved round by round, so a neighbour's load falls on all of them alike.

    OMP_NUM_THREADS=1 .venv/bin/python bench/recipe_speed.py --out bench/results/recipe_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from phisearch.indexer.model.config import preset
from phisearch.indexer.model.unet import UNet
from phisearch.indexer.train.loop import augment, loss_fn
from phisearch.indexer.train.schedule import downscale, sample_sigmas
from phisearch.indexer.train.speed import StepMode, probe


def setting(res: int, batch: int, p: str, mode: StepMode, gen: torch.Generator):
    """A model, optimizer and moving average for one (resolution, batch) arm."""
    torch.manual_seed(0)
    model = UNet(preset(p))
    if mode.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999))
    x = torch.rand(batch, 3, 64, 64, generator=gen)

    def step() -> float:
        c0 = time.process_time()
        xs = downscale(augment(x, gen), res)
        sig = sample_sigmas(len(xs), gen, "paper")
        xs, z = mode.prepare(xs, torch.randn(xs.shape, generator=gen))
        with mode.autocast(torch.device("cpu")):
            loss = loss_fn(model, xs, sig, z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update_parameters(model)
        return time.process_time() - c0
    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small64")
    ap.add_argument("--resolutions", default="64,32")
    ap.add_argument("--batches", default="16,32,64")
    ap.add_argument("--rounds", type=int, default=5, help="timed steps per setting")
    ap.add_argument("--out", default="bench/results/recipe_speed.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    keys = [(r, b) for r in map(int, a.resolutions.split(",")) for b in map(int, a.batches.split(","))]
    mode, _ = probe(UNet(preset(a.preset)), 32)
    print(f"step mode: {mode.label}")
    steps = {k: setting(*k, a.preset, mode, gen) for k in keys}
    for k in keys:   # warm-up: first-touch allocations, oneDNN kernel selection
        steps[k]()
    cpu = {k: [] for k in keys}
    for _ in range(a.rounds):
        for k in keys:
            cpu[k].append(steps[k]())
    rows = []
    base = sorted(cpu[keys[0]])[a.rounds // 2] / keys[0][1]
    for (res, batch) in keys:
        med = sorted(cpu[(res, batch)])[a.rounds // 2]
        rows.append({"resolution": res, "batch": batch, "cpu_s_per_step": round(med, 4),
                     "img_per_cpu_s": round(batch / med, 1),
                     "vs_first": round(base / (med / batch), 2)})
        print(f"{res}x{res} batch {batch:4d}: {med:.3f} CPU-s/step, {batch / med:6.1f} img/CPU-s, "
              f"{rows[-1]['vs_first']:.2f}x the images per CPU-second of {keys[0][0]}x{keys[0][0]} "
              f"batch {keys[0][1]}")
    out = {"bench": "recipe_speed", "preset": a.preset, "threads": 1, "rounds": a.rounds,
           "step_mode": mode.label,
           "host": platform.processor() or platform.machine(), "torch": torch.__version__,
           "rows": rows, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
