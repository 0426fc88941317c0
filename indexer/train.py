"""Resumable training of the denoiser (SPEC §1) and its denoising evaluation (PSNR).

Training state lives in the output folder: `model.safetensors` + `model.json` (the checkpoint),
`train_state.safetensors` (Adam moments, as tensors: never pickled), `train_log.jsonl` (one line
per log interval) and `curve/step-NNNNNN.safetensors` (log-spaced snapshots for the learning
curve). Killing a run loses at most the steps since the last save.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from . import checkpoint as ckpt
from .config import preset
from .embedder import pick_device
from .phi import as_float
from .shards import Batch, expand, loader
from .unet import UNet

log = logging.getLogger(__name__)

EVAL_SIGMAS = (0.05, 0.1, 0.2, 0.4)


@dataclass(frozen=True)
class TrainConfig:
    data: tuple[str, ...]                 # training shards (paths / brace patterns)
    out: str                              # output folder (checkpoint, state, log, curve)
    preset: str = "small64"               # network preset (config.PRESETS)
    batch_size: int = 32                  # small on CPU: more steps per minute
    lr: float = 1e-3                      # Adam learning rate (SPEC §1)
    halve_every_epochs: float = 100.0     # lr halves every this many epochs (SPEC: 100)
    max_steps: int | None = None          # stop after this many steps in total ...
    minutes: float | None = None          # ... or after this many minutes in this run
    workers: int = 1                      # loader processes decoding JPEGs
    seed: int = 0                         # init, shuffling and noise
    test_data: tuple[str, ...] = ()       # shard(s) for periodic PSNR
    eval_images: int = 256                # test images used for periodic PSNR
    save_every_minutes: float = 3.0       # checkpoint interval
    eval_every_minutes: float = 10.0      # periodic PSNR interval
    device: str = "auto"                  # auto | cpu | cuda
    dtype: str = "auto"                   # auto (probe on CPU, bf16 on CUDA) | fp32 | bf16
    compile: bool = False                 # torch.compile on CUDA
    init_from: str | None = None          # warm start from this checkpoint (no optimizer state)
    sigma_dist: str = "paper"             # paper (√σ uniform on [0, 1]) | uniform (σ uniform)
    curve_steps: tuple[int, ...] = field(default_factory=lambda: tuple(
        sorted({int(m * 10 ** e) for e in range(7) for m in (1, 2, 5)} | {0})))


SIGMA_DISTS = ("paper", "uniform")


def sample_sigmas(n: int, generator: torch.Generator, dist: str = "paper") -> torch.Tensor:
    """σ ∈ [0, 1]. paper: √σ uniform, density ∝ σ^-1/2, small σ frequent (SPEC §1); uniform:
    flat, so large σ (where only global content helps) are drawn 3x as often (issue 9)."""
    if dist not in SIGMA_DISTS:
        raise ValueError(f'unknown sigma distribution "{dist}"; choose from {SIGMA_DISTS}')
    u = torch.rand(n, generator=generator)
    return u ** 2 if dist == "paper" else u


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and random 64x64 crops of a 4-px reflect-padded image."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    pad = 4
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(-1, 1) + torch.arange(h)).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * pad)
    xp = xp.gather(2, rows)
    cols = (dx.view(-1, 1) + torch.arange(w)).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    return xp.gather(3, cols)


def loss_fn(model: UNet, x: torch.Tensor, sigma: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors per image, averaged over the batch (SPEC §1)."""
    y = x + sigma.view(-1, 1, 1, 1) * z
    return (model(y).float() - x).pow(2).sum((1, 2, 3)).mean()


def probe_cpu_dtype(model: UNet, batch_size: int) -> torch.dtype:
    """bf16 autocast is 3x faster on some CPUs and 10x slower on others (STACK.md): time both."""
    x = torch.rand(batch_size, model.cfg.in_channels, 64, 64)
    times = {}
    for dt in (torch.float32, torch.bfloat16):
        m = UNet(model.cfg)
        m.load_state_dict(model.state_dict())
        opt = torch.optim.Adam(m.parameters(), lr=0)
        best = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=dt, enabled=dt != torch.float32):
                loss = (m(x).float() - x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            best = min(best, time.perf_counter() - t0)
        times[dt] = best
    choice = min(times, key=times.get)
    log.info("CPU dtype probe (s/step): fp32 %.3f, bf16 %.3f -> %s",
             times[torch.float32], times[torch.bfloat16], choice)
    return choice


def psnr(x: torch.Tensor, ref: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """Per-image PSNR in dB for images in [0, 1] (estimates clamped to [0, 1]). (N,)"""
    x = x.float().clamp(0, 1) if clamp else x.float()
    mse = (x - ref.float()).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-12))


def gaussian_blur(x: torch.Tensor, width: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding: the classical baseline."""
    r = max(1, int(math.ceil(3 * width)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / width) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


BLUR_WIDTHS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.2, 1.4, 1.7, 2.0, 2.5, 3.0)


def load_images(urls: list[str], limit: int) -> np.ndarray:
    """The first `limit` decodable images of the shards, in order: (N, 64, 64, 3) uint8."""
    out: list[np.ndarray] = []
    for batch in loader(urls, batch_size=256, workers=0):
        out.extend(s.image for s in batch.samples)
        if len(out) >= limit:
            break
    return np.stack(out[:limit])


@torch.no_grad()
def denoise_eval(model: UNet, images: np.ndarray, sigmas=EVAL_SIGMAS, seed: int = 0,
                 batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Mean per-image PSNR (dB) of the noisy input, of x̂ and of the best Gaussian blur per σ."""
    model.eval()
    device = next(model.parameters()).device
    x = as_float(images)
    g = torch.Generator().manual_seed(seed)
    table = {}
    for s in sigmas:
        z = torch.randn(x.shape, generator=g)
        y = x + s * z
        den = torch.cat([model(y[i:i + batch_size].to(device)).float().cpu()
                         for i in range(0, len(y), batch_size)])
        blur = max(psnr(gaussian_blur(y, w), x).mean().item() for w in BLUR_WIDTHS)
        # the noisy input as the network sees it (unclamped: 20 dB at σ = 0.1)
        table[str(float(s))] = {"noisy": round(psnr(y, x, clamp=False).mean().item(), 3),
                                "denoised": round(psnr(den, x).mean().item(), 3),
                                "baseline": round(blur, 3)}
    return table


# ---------------------------------------------------------------- optimizer state (no pickle)

def save_state(path: Path, opt: torch.optim.Optimizer, meta: dict) -> None:
    tensors = {}
    for i, p in enumerate(opt.param_groups[0]["params"]):
        st = opt.state.get(p, {})
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                tensors[f"{i}.{k}"] = st[k].detach().float().contiguous().cpu()
        if "step" in st:
            tensors[f"{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)


def load_state(path: Path, opt: torch.optim.Optimizer) -> dict:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for i, p in enumerate(opt.param_groups[0]["params"]):
        if f"{i}.exp_avg" in tensors:
            opt.state[p] = {"step": tensors[f"{i}.step"].reshape(()).clone(),
                            "exp_avg": tensors[f"{i}.exp_avg"].to(p.device),
                            "exp_avg_sq": tensors[f"{i}.exp_avg_sq"].to(p.device)}
    return meta


def dataset_size(urls: list[str]) -> int:
    """Samples in the shards, from the folder's manifest.json when it lists them."""
    total = 0
    for url in urls:
        manifest = Path(url).parent / "manifest.json"
        n = None
        if manifest.is_file():
            for split in json.loads(manifest.read_text()).get("splits", {}).values():
                for sh in split.get("shards", []):
                    if sh.get("file") == Path(url).name:
                        n = sh.get("samples")
        total += n if n else 1000
    return total


# ---------------------------------------------------------------- the loop

def train(cfg: TrainConfig, progress: Callable[[dict], None] | None = None,
          on_step: Callable[[int, float], None] | None = None) -> Path:
    """Train (or resume) until cfg.max_steps or cfg.minutes. Returns the checkpoint path.
    `progress` gets running averages every few seconds; `on_step(step, loss)` every step."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "curve").mkdir(exist_ok=True)
    ckpt_path, state_path = out / "model.safetensors", out / "train_state.safetensors"
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    urls = expand(cfg.data)
    n_data = dataset_size(urls)

    state = {"step": 0, "images": 0, "seconds": 0.0, "runs": 0}
    history: list[dict] = []
    if ckpt_path.exists():
        loaded = ckpt.load(ckpt_path, device)
        model = loaded.model.train()
        history = loaded.info.get("psnr_history", [])
        log.info("resuming from %s", ckpt_path)
    elif cfg.init_from:
        loaded = ckpt.load(cfg.init_from, device)
        model = loaded.model.train()
        history = loaded.info.get("psnr_history", [])
        state.update(step=loaded.info.get("steps", 0), images=loaded.info.get("images_seen", 0),
                     seconds=loaded.info.get("train_seconds", 0.0))
        log.warning("warm start from %s: weights only, Adam moments start from zero", cfg.init_from)
    else:
        model = UNet(preset(cfg.preset)).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    if ckpt_path.exists() and state_path.exists():
        state.update(load_state(state_path, opt))
    start_step = state["step"]

    if device.type == "cuda":
        amp = torch.bfloat16 if cfg.dtype in ("auto", "bf16") else None
        model = model.to(memory_format=torch.channels_last)
    elif cfg.dtype == "auto":
        amp = probe_cpu_dtype(model, cfg.batch_size)
        amp = None if amp == torch.float32 else amp
    else:
        amp = torch.bfloat16 if cfg.dtype == "bf16" else None
    fwd = torch.compile(model) if cfg.compile and device.type == "cuda" else model

    test_images = load_images(expand(cfg.test_data), cfg.eval_images) if cfg.test_data else None
    g = torch.Generator().manual_seed(cfg.seed * 7919 + start_step)
    data = loader(urls, cfg.batch_size, workers=cfg.workers, shuffle_buffer=2000, repeat=True,
                  seed=cfg.seed + start_step)
    stop = {"flag": False}

    def on_sigint(signum, frame):  # finish the step, save, exit cleanly
        stop["flag"] = True

    old_handler = signal.signal(signal.SIGINT, on_sigint)
    # A warm start keeps the preset of the checkpoint it starts from (None for a custom config).
    preset_name = (loaded.info.get("preset") or None) if cfg.init_from else cfg.preset
    record = {"preset": preset_name, "train": asdict(cfg),
              "data": {"shards": urls, "samples": n_data}, "device": str(device),
              "dtype": str(amp or torch.float32)}

    def save(final: bool = False) -> None:
        nonlocal history
        info = dict(record, steps=state["step"], images_seen=state["images"],
                    epochs=round(state["images"] / n_data, 3), train_seconds=round(state["seconds"], 1),
                    psnr_history=history)
        if test_images is not None and final:
            info["psnr"] = denoise_eval(model.eval(), test_images)
            model.train()
        ckpt.save(model, ckpt_path, info, preset_name=info.get("preset") or None)
        save_state(state_path, opt, dict(step=state["step"], images=state["images"],
                                         seconds=state["seconds"], runs=state["runs"]))

    t_run = time.monotonic()
    t_save = t_eval = t_log = t_run
    imgs_since, loss_sum, loss_n = 0, 0.0, 0
    state["runs"] += 1
    try:
        for batch in data:
            if not isinstance(batch, Batch) or not batch.samples:
                continue
            if cfg.max_steps is not None and state["step"] >= cfg.max_steps:
                break
            if cfg.minutes is not None and time.monotonic() - t_run > cfg.minutes * 60:
                break
            if stop["flag"]:
                break
            if state["step"] in cfg.curve_steps:
                ckpt.save(model, out / "curve" / f"step-{state['step']:07d}.safetensors",
                          dict(steps=state["step"], images_seen=state["images"]),
                          preset_name=record["preset"])
            epoch = state["images"] / n_data
            lr = cfg.lr * 0.5 ** math.floor(epoch / cfg.halve_every_epochs)
            for group in opt.param_groups:
                group["lr"] = lr
            x = augment(as_float(batch.images()), g)
            sig, z = sample_sigmas(len(x), g, cfg.sigma_dist), torch.randn(x.shape, generator=g)
            x, sig, z = x.to(device), sig.to(device), z.to(device)
            if device.type == "cuda":
                x, z = x.contiguous(memory_format=torch.channels_last), z.contiguous(
                    memory_format=torch.channels_last)
            t0 = time.monotonic()
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = loss_fn(fwd, x, sig, z)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            state["seconds"] += time.monotonic() - t0
            state["step"] += 1
            state["images"] += len(x)
            imgs_since += len(x)
            step_loss = loss.item()
            loss_sum += step_loss
            loss_n += 1
            if on_step:
                on_step(state["step"], step_loss)
            now = time.monotonic()
            if progress and (now - t_log > 2 or state["step"] == start_step + 1):
                progress(dict(step=state["step"], loss=loss_sum / max(loss_n, 1), lr=lr,
                              img_per_s=imgs_since / max(now - t_log, 1e-9), epoch=epoch))
            if now - t_log > 30:
                with open(out / "train_log.jsonl", "a") as f:
                    f.write(json.dumps(dict(step=state["step"], images=state["images"],
                                            loss=round(loss_sum / loss_n, 3), lr=lr,
                                            img_per_s=round(imgs_since / (now - t_log), 2),
                                            time=time.time())) + "\n")
                imgs_since, loss_sum, loss_n, t_log = 0, 0.0, 0, now
            if test_images is not None and now - t_eval > cfg.eval_every_minutes * 60:
                p = denoise_eval(model.eval(), test_images[:128], sigmas=(0.1,))
                model.train()
                history.append(dict(step=state["step"], psnr_0_1=p["0.1"]["denoised"]))
                log.info("step %d: PSNR at sigma 0.1 = %.2f dB", state["step"],
                         p["0.1"]["denoised"])
                t_eval = time.monotonic()
            if now - t_save > cfg.save_every_minutes * 60:
                save()
                t_save = time.monotonic()
    finally:
        signal.signal(signal.SIGINT, old_handler)
    if state["step"] in cfg.curve_steps:
        ckpt.save(model, out / "curve" / f"step-{state['step']:07d}.safetensors",
                  dict(steps=state["step"], images_seen=state["images"]),
                  preset_name=record["preset"])
    save(final=True)
    return ckpt_path
