"""Training and φ speed on this host: every dtype x memory format, torch.compile on and off,
1 and 2 threads, in one run (ratios within one run; these machines are shared and noisy).

Training: img/s of a full step (forward, backward, Adam) on random images, batch 32.
φ pass (what `idx build` / `idx eval` run): img/s of the encoder + middle block, batch 64, and
how far bf16 / channels_last vectors are from fp32 NCHW (max relative error of the middle-block
means), so a faster mode is made the default only where its vectors agree.

A mode whose first step is already 4x slower than the best so far is dropped (bf16 on an
AVX2-only CPU runs 10x slower: minutes per config otherwise).

    .venv/bin/python bench/train_speed.py --preset small64 --out bench/results/train_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from phisearch.indexer.model.config import preset
from phisearch.indexer.model.phi import MID, features
from phisearch.indexer.model.unet import UNet
from phisearch.indexer.train.speed import StepMode, cpu_flags

MODES = (StepMode(), StepMode(channels_last=True), StepMode(torch.bfloat16),
         StepMode(torch.bfloat16, channels_last=True))


def train_rate(model: UNet, mode: StepMode, batch: int, steps: int, compiled: bool,
               give_up_s: float) -> dict:
    m = UNet(model.cfg)
    m.load_state_dict(model.state_dict())
    if mode.channels_last:
        m = m.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    fwd = torch.compile(m) if compiled else m
    x, = mode.prepare(torch.rand(batch, 3, 64, 64))
    times, t_first = [], time.perf_counter()
    for i in range(steps + 1):            # step 0 warms up (and compiles)
        t0 = time.perf_counter()
        with mode.autocast(torch.device("cpu")):
            loss = (fwd(x).float() - x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i > 0:
            times.append(time.perf_counter() - t0)
        elif not compiled and time.perf_counter() - t0 > give_up_s:
            return {"img_per_s": None, "note": f"first step {time.perf_counter() - t0:.1f} s: "
                    "dropped", "seconds": round(time.perf_counter() - t_first, 1)}
    best = min(times)
    return {"img_per_s": round(batch / best, 2), "s_per_step": round(best, 4),
            "seconds": round(time.perf_counter() - t_first, 1)}


def phi_rate(model: UNet, mode: StepMode, images: torch.Tensor, ref: torch.Tensor | None,
             give_up_s: float) -> tuple[dict, torch.Tensor]:
    m = UNet(model.cfg)
    m.load_state_dict(model.state_dict())
    m.eval()
    if mode.channels_last:
        m = m.to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    amp = mode.dtype if mode.dtype != torch.float32 else None
    out = features(m, images, 0.2, 1, 0, (MID,), amp_dtype=amp)[MID]
    dt = time.perf_counter() - t0
    if dt > give_up_s:
        return {"img_per_s": round(len(images) / dt, 2), "note": "one pass only (slow)"}, out
    t0 = time.perf_counter()
    out = features(m, images, 0.2, 1, 0, (MID,), amp_dtype=amp)[MID]
    dt = time.perf_counter() - t0
    res = {"img_per_s": round(len(images) / dt, 2)}
    if ref is not None:
        res["max_rel_err_vs_fp32"] = round(float((out - ref).abs().max() / ref.abs().max()), 5)
    return res, out


def one(spec: dict) -> dict:
    """One training-speed measurement, in its own process (so a slow compile can be cut)."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = UNet(preset(spec["preset"]))
    mode = StepMode(torch.bfloat16 if spec["bf16"] else torch.float32, spec["channels_last"])
    return train_rate(model, mode, spec["batch"], spec["steps"], spec["compiled"],
                      spec["give_up_s"])


def measure(spec: dict, timeout: float) -> dict:
    import subprocess

    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"img_per_s": None, "note": f"did not finish in {timeout:.0f} s (compiling)"}
    if r.returncode != 0:
        return {"img_per_s": None, "note": r.stderr.strip().splitlines()[-1][:200]}
    out = json.loads(r.stdout)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(one(json.loads(sys.argv[2]))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small64")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--give-up-s", type=float, default=30.0)
    ap.add_argument("--compile-timeout", type=float, default=420.0)
    ap.add_argument("--out", default="bench/results/train_speed.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = UNet(preset(args.preset))
    images = torch.rand(64, 3, 64, 64)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    result = {"preset": args.preset, "batch": args.batch, "cpu_flags": sorted(cpu_flags()),
              "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "train": {}, "phi": {}}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        best = float("inf")
        # torch.compile is tried at the largest thread count only (a compile takes minutes)
        top = threads == max(int(t) for t in args.threads.split(","))
        for compiled in ((False,) if args.no_compile or not top else (False, True)):
            for mode in MODES:
                if compiled and mode.dtype == torch.bfloat16 and \
                        result["train"].get(f"t{threads} {mode.label}", {}).get("img_per_s") is None:
                    continue   # dropped uncompiled: compiling it will not rescue it
                name = f"t{threads} {mode.label}{' +compile' if compiled else ''}"
                spec = {"preset": args.preset, "threads": threads, "bf16": mode.dtype ==
                        torch.bfloat16, "channels_last": mode.channels_last, "batch": args.batch,
                        "steps": args.steps, "compiled": compiled,
                        "give_up_s": min(args.give_up_s, 4 * best)}
                r = measure(spec, args.compile_timeout if compiled else 150)
                result["train"][name] = r
                Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
                if r["img_per_s"]:
                    best = min(best, args.batch / r["img_per_s"])
                print(f"train {name:36s} {r}", file=sys.stderr, flush=True)
        ref = None
        for mode in MODES:
            name = f"t{threads} {mode.label}"
            r, out = phi_rate(model, mode, images, ref, args.give_up_s)
            if ref is None:
                ref = out
            result["phi"][name] = r
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
            print(f"phi   {name:36s} {r}", file=sys.stderr, flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
