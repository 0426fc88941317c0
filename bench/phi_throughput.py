"""φ throughput: the truncated pass (E1–E3 + M only, what indexing runs) against the full forward.

Both sides run the same production code path, `phi.features`: the noise for each image is drawn
from its pixel-seeded CPU generator, the draws are folded into the batch, and φ is the mean of
the middle block's spatial means. The truncated side asks for the middle block only (so the
decoder never runs, `model.encode`); the full side also asks for a decoder tap, which makes
`features` run the whole network, `model(y)`. The ratio is truncated img/s ÷ full img/s.

Images are real (the mini shard); weights are random (speed does not depend on them). CPU runs
fp32 with `--threads` intra-op threads; CUDA (when present) runs bf16 autocast. Each config gets
a warm-up call and the best of `--repeats` timed calls; a config whose estimated cost exceeds
`--budget-s` gets fewer repeats, or is skipped and says so.

    .venv/bin/python bench/phi_throughput.py --preset small64 --note "training job running"
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import socket
import sys
import time
from pathlib import Path

import torch
from phisearch.indexer.model import phi as phimod
from phisearch.indexer.model.config import PRESETS, preset
from phisearch.indexer.model.unet import UNet, count_parameters
from phisearch.indexer.train.loop import load_images

REPO = Path(__file__).resolve().parent.parent
MINI = "imagenette-64/imagenette-mini-000000.tar"


def data_root() -> Path:
    return Path(os.environ.get("PHISEARCH_DATA", REPO.parent / "shared" / "data"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@torch.no_grad()
def conv_macs(model: UNet) -> dict[str, int]:
    """Multiply-accumulates of the convolutions per 64x64 image: encoder+M vs the whole net."""
    counts = {"n": 0}

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.ConvTranspose2d):
            counts["n"] += inp[0].numel() * mod.out_channels * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            counts["n"] += out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * \
                mod.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    y = torch.rand(1, model.cfg.in_channels, 64, 64)
    model.encode(y)
    trunc = counts["n"]
    counts["n"] = 0
    model(y)
    for h in handles:
        h.remove()
    return {"truncated": trunc, "full": counts["n"], "ratio": round(counts["n"] / trunc, 2)}


def run_once(model: UNet, images, sigma: float, draws: int, full: bool,
             amp: torch.dtype | None, device: torch.device) -> float:
    taps = (phimod.MID, "D1.out") if full else (phimod.MID,)
    t0 = time.perf_counter()
    out = phimod.features(model, images, sigma, draws, seed=0, taps=taps, amp_dtype=amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert out[phimod.MID].shape[0] == len(images)
    return time.perf_counter() - t0


def bench_device(device: torch.device, args, images, t_start: float) -> list[dict]:
    """One row per (batch, draws), smallest work first. Within a config the truncated and full
    calls alternate, so a change in background load hits both sides alike."""
    torch.manual_seed(0)
    model = UNet(preset(args.preset)).to(device).eval()
    amp = torch.bfloat16 if device.type == "cuda" else None
    kinds = {"truncated": False, "full": True}
    per_pass: dict[str, float | None] = {k: None for k in kinds}  # seconds per image x draw
    rows = []
    configs = sorted(((b, d) for b in args.batch_sizes for d in args.draws), key=lambda c: c[0] * c[1])
    for b, d in configs:
        row: dict = {"device": device.type, "dtype": "bf16" if amp else "fp32", "batch": b,
                     "draws": d}
        imgs = images[:b]
        run: dict[str, int] = {}  # kind -> timed repeats
        for kind, full in kinds.items():
            est = per_pass[kind] * b * d if per_pass[kind] else None
            if time.perf_counter() - t_start > args.max_seconds:
                row[f"{kind}_skipped"] = f"run time cap {args.max_seconds:.0f} s reached"
            elif est is not None and est > args.budget_s:
                row[f"{kind}_skipped"] = (f"estimated {est:.0f} s per call exceeds the "
                                          f"{args.budget_s:.0f} s budget")
            elif est is not None and 2 * est > args.budget_s:
                # room for one call only: the process is warm from the smaller configs
                run[kind] = 1
                row[f"{kind}_warmup"] = False
            else:
                warm = run_once(model, imgs, args.sigma, d, full, amp, device)
                per_pass[kind] = warm / (b * d)
                run[kind] = max(1, min(args.repeats, int(args.budget_s // warm) - 1))
        best = {k: math.inf for k in run}
        done = {k: 0 for k in run}
        for i in range(max(run.values(), default=0)):
            if i and time.perf_counter() - t_start > args.max_seconds:
                break  # the cap also cuts repeats short (one timed call per side stays)
            for kind, n in run.items():
                if i < n:
                    t = run_once(model, imgs, args.sigma, d, kinds[kind], amp, device)
                    best[kind] = min(best[kind], t)
                    done[kind] += 1
        for kind in kinds:
            if kind in run:
                per_pass[kind] = best[kind] / (b * d)
                row[f"{kind}_s"] = round(best[kind], 4)
                row[f"{kind}_repeats"] = done[kind]
            row[f"{kind}_img_s"] = round(b / best[kind], 2) if kind in run else None
        tr, fu = row["truncated_img_s"], row["full_img_s"]
        row["ratio"] = round(tr / fu, 2) if tr and fu else None
        rows.append(row)
        print(fmt_row(row), flush=True)
    return rows


def fmt_row(r: dict) -> str:
    def f(v):
        return f"{v:10.1f}" if isinstance(v, (int, float)) else f"{'skipped':>10}"

    ratio = f"{r['ratio']:6.2f}x" if r["ratio"] else f"{'-':>7}"
    return (f"{r['device']:>5} {r['dtype']:>5} {r['batch']:>6} {r['draws']:>6} "
            f"{f(r.get('truncated_img_s'))} {f(r.get('full_img_s'))} {ratio}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small64", choices=sorted(PRESETS))
    p.add_argument("--draws", type=int, nargs="+", default=[1, 4, 20])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--sigma", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=2, help="CPU intra-op threads")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per config (best kept)")
    p.add_argument("--budget-s", type=float, default=20.0,
                   help="max seconds per config and pass kind (warm-up included); fewer "
                   "repeats, or a skip, beyond it")
    p.add_argument("--max-seconds", type=float, default=150.0,
                   help="start no new measurement after this many seconds in all")
    p.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    p.add_argument("--note", default="", help="e.g. 'training job running concurrently'")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "phi_throughput.json"))
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    shard = data_root() / MINI
    if not shard.is_file():
        sys.exit(f"error: mini shard not found: {shard} (set PHISEARCH_DATA)")
    images = load_images([str(shard)], max(args.batch_sizes))
    if len(images) < max(args.batch_sizes):  # the mini shard has 100; tile for larger batches
        reps = math.ceil(max(args.batch_sizes) / len(images))
        images = images.repeat(reps, axis=0)[: max(args.batch_sizes)]

    devices = []
    if args.device in ("all", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))

    result = {
        "benchmark": "phi_throughput",
        "preset": args.preset,
        "parameters": count_parameters(UNet(preset(args.preset))),
        "conv_macs_per_image": conv_macs(UNet(preset(args.preset)).eval()),
        "weights": "random init (seed 0)",
        "images": f"{MINI} (real 64x64 JPEGs)",
        "sigma": args.sigma,
        "metric": "images/s of phi (each image = `draws` network passes); ratio = truncated/full",
        "hostname": socket.gethostname(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": args.threads,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "repeats": args.repeats,
        "budget_s": args.budget_s,
        "max_seconds": args.max_seconds,
        "timing": "per config: one warm-up call per side (none where only one call fits the "
                  "budget: *_warmup false), then truncated and full calls alternate; best of "
                  "the repeats; noise generation included on both sides",
        "note": args.note,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "results": [],
    }
    print(f"phi throughput, preset {args.preset} ({result['parameters'] / 1e6:.2f} M params), "
          f"{result['cpu_model']}, {args.threads} CPU threads, torch {torch.__version__}")
    macs = result["conv_macs_per_image"]
    print(f"conv MACs per image: truncated {macs['truncated'] / 1e9:.2f} G, full "
          f"{macs['full'] / 1e9:.2f} G (ratio {macs['ratio']}x, the ideal speed-up)")
    if args.note:
        print(f"note: {args.note}")
    print(f"{'dev':>5} {'dtype':>5} {'batch':>6} {'draws':>6} {'trunc/s':>10} {'full/s':>10} "
          f"{'ratio':>7}")
    t0 = time.perf_counter()
    for device in devices:
        result["results"] += bench_device(device, args, images, t0)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} ({result['seconds']} s)")
    return result


if __name__ == "__main__":
    main()
