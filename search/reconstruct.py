"""Self-guided reconstruction (SPEC §4): draw images whose φ matches a target φ*.

What the samples share shows what φ* encodes. Two samplers:
  A  a fixed, decreasing schedule of noise levels: re-noise, guide, denoise (the authors' ImageNet
     sampler);
  B  the adaptive stochastic coarse-to-fine sampler (Kadkhodaie & Simoncelli) with a guidance
     step before each update; without a target it is the plain unconditional sampler.
Guidance (`match`) runs Adam on the pixels with gradients through E1–E3 and M only: the decoder
never runs inside the guidance loop. Noise comes from a CPU generator seeded by `seed`, so a seed
gives the same samples on any device (up to floating-point differences between devices).
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from phisearch.indexer.model.config import PhiConfig
from phisearch.indexer.model.phi import as_float, as_uint8, phi
from phisearch.indexer.model.unet import UNet
from phisearch.search.schedules import SCHEDULES, Schedule, schedule  # noqa: F401
from torch import Tensor

log = logging.getLogger(__name__)

# Per-channel mean of the 100 images of shared/data/imagenette-64/imagenette-mini-000000.tar
# (decoded by indexer.images, RGB in [0, 1]); computed once, 2026-11-25.
IMAGENETTE_MEAN = (0.4355, 0.4403, 0.4152)


# ----------------------------------------------------------------------------- guidance


Tick = Callable[[], None]   # called after every batched network pass; may raise to stop


@dataclass
class Match:
    """What one guidance call did, per sample."""

    y: Tensor          # (N, 3, H, W) the guided images
    steps: Tensor      # (N,) Adam updates taken (< max_steps when the sample reached tol)
    loss0: Tensor      # (N,) starting loss
    loss: Tensor       # (N,) loss at the last evaluation
    batch_steps: int   # batched passes through the encoder (the cost)


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None or amp_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def _mid_mean(model: UNet, y: Tensor, amp_dtype: torch.dtype | None) -> Tensor:
    with _autocast(y.device, amp_dtype):
        mid, _ = model.encode(y)                       # (N, C, h, w); the decoder never runs
    return mid.float().mean(dim=(-2, -1))              # (N, C)


def match(model: UNet, y: Tensor, target: Tensor, lr: float = 0.01, max_steps: int = 100,
          tol: float = 0.01, amp_dtype: torch.dtype | None = None,
          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          tick: Tick | None = None) -> Match:
    """The guidance step of SPEC §4: Adam on the pixels of y (N, 3, H, W) minimizing
    mean_c (ā_M(y)_c − φ*_c)², target (C,) or (N, C). Each sample stops once its loss is
    <= tol × its starting loss; stopped samples leave the batch, so they cost nothing more.
    tick() runs after every step: it may raise to stop the work (the UI's Cancel)."""
    n = y.shape[0]
    target = torch.as_tensor(target, dtype=torch.float32, device=y.device)
    target = target.expand(n, -1) if target.dim() == 1 or target.shape[0] == 1 else target
    if target.shape != (n, model.mid_channels):
        raise ValueError(f"target must be ({model.mid_channels},) or ({n}, "
                         f"{model.mid_channels}), got {tuple(target.shape)}")
    y = y.detach().clone()
    m, v = torch.zeros_like(y), torch.zeros_like(y)    # Adam moments, per pixel
    steps = torch.zeros(n, dtype=torch.long)
    loss0 = torch.zeros(n)
    loss = torch.zeros(n)
    active = torch.arange(n)                           # samples still moving
    batch_steps = 0
    for t in range(max_steps):
        ya = y[active].requires_grad_(True)
        la = (_mid_mean(model, ya, amp_dtype) - target[active]).pow(2).mean(dim=1)  # (A,)
        lcpu = la.detach().cpu()
        if t == 0:
            loss0 = lcpu.clone()
        loss[active] = lcpu
        go = lcpu > tol * loss0[active]                # the ones that have not reached tol
        if not go.any():
            break
        # Per-image StdNorm keeps samples independent, so the gradient of the sum is per sample.
        (g,) = torch.autograd.grad(la[go.to(la.device)].sum(), ya)
        batch_steps += 1
        active = active[go]
        g = g[go.to(g.device)]
        idx = active.to(y.device)
        m[idx] = betas[0] * m[idx] + (1 - betas[0]) * g
        v[idx] = betas[1] * v[idx] + (1 - betas[1]) * g * g
        # Every active sample has taken exactly t updates (samples only ever stop).
        mhat = m[idx] / (1 - betas[0] ** (t + 1))
        vhat = v[idx] / (1 - betas[1] ** (t + 1))
        y[idx] = y[idx] - lr * mhat / (vhat.sqrt() + eps)
        steps[active] += 1
        if tick is not None:
            tick()
    return Match(y.detach(), steps, loss0, loss, batch_steps)


# ----------------------------------------------------------------------------- sampling


@dataclass
class Reconstruction:
    """Samples and how well their φ matches the target."""

    samples: Tensor                 # (N, 3, H, W) float32 in [0, 1], on the CPU
    target_index: np.ndarray        # (N,) which target each sample belongs to
    phi_target: Tensor | None       # (T, C) φ* the error is measured against (None: no target)
    phi_rel_error: np.ndarray       # (N,) ||φ(x̂) − φ*|| / ||φ*|| (NaN without a target)
    seconds: float                  # wall time, target φ and final measurement included
    steps: int                      # guidance steps summed over samples and levels
    batch_steps: int                # batched encoder passes in the guidance (the cost)
    levels_run: int                 # levels (A) or iterations (B) taken
    schedule: Schedule
    phi_config: PhiConfig           # σ, draws and seed of the final φ measurement
    steps_per_sample: np.ndarray    # (N,) guidance steps per sample

    def images(self) -> np.ndarray:
        """The samples as (N, H, W, 3) uint8: what is shown, and what the error is measured on."""
        return as_uint8(self.samples)


Callback = Callable[[dict], None]


def _phi_target_fn(model: UNet, images: Tensor | np.ndarray | None, target: Tensor | None,
                   draws: int, seed: int) -> Callable[[float], Tensor]:
    """σ -> φ*_σ (T, C): the target image's φ at σ (σ-matched) or the fixed target."""
    if images is None:
        return lambda sigma: target                   # fixed-target mode
    cache: dict[float, Tensor] = {}

    def at(sigma: float) -> Tensor:
        key = round(float(sigma), 6)
        if key not in cache:
            cache[key] = phi(model, images, key, draws, seed)
        return cache[key]

    return at


def _renoise(x: Tensor, z: Tensor, sigma: float, y_prev: Tensor | None, sigma_prev: float,
             how: str) -> Tensor:
    """Algorithm A's noisy image at level σ from the estimate x (see RENOISE)."""
    if how == "fresh" or y_prev is None or sigma_prev <= sigma:
        return x + sigma * z
    eps = (y_prev - x) / sigma_prev                  # the noise the last level's denoiser removed
    s = 0.0 if how == "ddim" else sigma * math.sqrt(1 - (sigma / sigma_prev) ** 2)
    return x + math.sqrt(sigma ** 2 - s ** 2) * eps + s * z


def _sample_a(model: UNet, x: Tensor, targets: Callable[[float], Tensor] | None,
              index: Tensor, sch: Schedule, gen: torch.Generator,
              amp_dtype: torch.dtype | None, callback: Callback | None, tick: Tick | None):
    """Algorithm A (SPEC §4): for σ_k decreasing, y = x + σ_k z; y = match(y, φ*_k); x = x̂(y)."""
    sigmas = sch.sigmas()
    steps = torch.zeros(x.shape[0], dtype=torch.long)
    batch_steps = 0
    y_prev, sigma_prev = None, 0.0
    for k, sigma in enumerate(sigmas.tolist()):
        z = torch.randn(x.shape, generator=gen).to(x.device)
        y = _renoise(x, z, sigma, y_prev, sigma_prev, sch.renoise)   # re-noise the estimate
        loss = float("nan")
        if targets is not None and sch.inner_steps > 0:        # guidance
            res = match(model, y, targets(sigma)[index], sch.lr, sch.inner_steps, sch.tol,
                        amp_dtype, tick=tick)
            y, steps, batch_steps = res.y, steps + res.steps, batch_steps + res.batch_steps
            loss = float(res.loss.mean())
        with torch.no_grad(), _autocast(x.device, amp_dtype):
            x = model(y).float()                                # full denoising step
        y_prev, sigma_prev = y, sigma
        if tick is not None:
            tick()
        if callback is not None:
            callback({"level": k + 1, "levels": len(sigmas), "sigma": sigma, "loss": loss,
                      "steps": int(steps.sum())})
    return x, steps, batch_steps, len(sigmas)


def _sample_b(model: UNet, x: Tensor, targets: Callable[[float], Tensor] | None,
              index: Tensor, sch: Schedule, gen: torch.Generator,
              amp_dtype: torch.dtype | None, callback: Callback | None, tick: Tick | None):
    """Algorithm B (SPEC §4): per step, guidance; f = y − x̂(y); σ_t = ||f||/√D;
    γ_t = σ_t √((1 − βh)² − (1 − h)²); y ← y − h f + γ_t z; stop a sample when σ_t < σ_L."""
    n, d = x.shape[0], x[0].numel()
    y = x + sch.sigma_max * torch.randn(x.shape, generator=gen).to(x.device)
    sigma = torch.full((n,), sch.sigma_max)
    steps = torch.zeros(n, dtype=torch.long)
    batch_steps = 0
    # σ-matched targets are taken on a geometric grid of σ so they can be cached.
    grid = torch.logspace(math.log10(sch.sigma_min), math.log10(max(sch.sigma_max, 1.0)), 48)
    active = torch.arange(n)
    t = 0
    while len(active) and t < sch.levels:
        t += 1
        h = sch.h0 * t / (1 + sch.h0 * (t - 1))
        idx = active.to(x.device)
        ya = y[idx]
        loss = float("nan")
        if targets is not None and sch.inner_steps > 0:        # guidance
            snap = (grid.log()[None] - sigma[active].clamp(grid[0], grid[-1]).log()[:, None])
            g_idx = snap.abs().argmin(dim=1)
            phis = torch.stack([targets(float(grid[j]))[index[i]]
                                for i, j in zip(active.tolist(), g_idx.tolist())])
            res = match(model, ya, phis, sch.lr, sch.inner_steps, sch.tol, amp_dtype,
                        tick=tick)
            ya, batch_steps = res.y, batch_steps + res.batch_steps
            steps[active] += res.steps
            loss = float(res.loss.mean())
        with torch.no_grad(), _autocast(x.device, amp_dtype):
            xa = model(ya).float()
        if tick is not None:
            tick()
        f = ya - xa                                             # (A, 3, H, W), the scaled score
        sig = (f.flatten(1).norm(dim=1) / math.sqrt(d)).cpu()   # noise level estimate per sample
        sigma[active] = sig
        x[idx] = xa
        gamma = sig * math.sqrt((1 - sch.beta * h) ** 2 - (1 - h) ** 2)
        z = torch.randn(ya.shape, generator=gen).to(x.device)
        y[idx] = ya - h * f + gamma.to(x.device).view(-1, 1, 1, 1) * z
        active = active[sig >= sch.sigma_min]
        if callback is not None:
            callback({"level": t, "levels": sch.levels, "sigma": float(sig.max()),
                      "loss": loss, "steps": int(steps.sum()), "active": len(active)})
    return x, steps, batch_steps, t


def reconstruct(model: UNet, target: Tensor | np.ndarray | None = None, *,
                images: Tensor | np.ndarray | None = None, n: int = 8,
                sch: Schedule | None = None, seed: int = 0, phi_config: PhiConfig | None = None,
                mean_rgb: tuple[float, float, float] = IMAGENETTE_MEAN, size: int = 64,
                amp_dtype: torch.dtype | None = None, callback: Callback | None = None,
                tick: Tick | None = None) -> Reconstruction:
    """Draw n samples per target (SPEC §4), on the model's device.

    images: (T, H, W, 3) uint8 or (T, 3, H, W) in [0, 1] -> σ-matched mode, φ*_k = φ(image; σ_k,
    sch.draws, phi_config.seed). target: (C,) or (T, C) middle-block means -> fixed-target mode.
    Neither -> unconditional. Samples are target-major: sample i belongs to target i // n.
    The error is measured on the uint8-rounded samples with φ at phi_config's σ, draws and seed
    (a collection's settings for stored vectors), against φ* = the target, or φ(image; same).
    callback gets a dict after each level; tick() runs after every network pass and may raise to
    stop the run (nothing is returned then).
    """
    t0 = time.perf_counter()
    sch = sch or SCHEDULES["fast"]
    pc = phi_config or PhiConfig()
    if images is not None and target is not None:
        raise ValueError("give a target vector or target images, not both")
    device = next(model.parameters()).device
    if images is not None:
        images_f = as_float(images)
        size = images_f.shape[-1]
        n_targets = images_f.shape[0]
        targets = _phi_target_fn(model, images, None, sch.draws, pc.seed)
        final = phi(model, images, pc.sigma, pc.effective_draws, pc.seed)          # (T, C)
    elif target is not None:
        tt = torch.as_tensor(np.asarray(target, np.float32))
        tt = tt[None] if tt.dim() == 1 else tt
        if tt.dim() != 2 or tt.shape[1] != model.mid_channels:
            raise ValueError(f"target must be ({model.mid_channels},) or (T, "
                             f"{model.mid_channels}), got {tuple(np.shape(target))}")
        if not torch.isfinite(tt).all():
            raise ValueError("target has NaN or infinite values")
        if (tt.norm(dim=1) == 0).any():
            raise ValueError("target vector is all zeros")
        n_targets = tt.shape[0]
        targets = _phi_target_fn(model, None, tt, sch.draws, pc.seed)
        final = tt
    else:
        n_targets, targets, final = 1, None, None
    index = torch.arange(n_targets).repeat_interleave(n)          # (N,) target of each sample
    gen = torch.Generator().manual_seed(int(seed))
    mean = torch.tensor(mean_rgb, dtype=torch.float32).view(1, 3, 1, 1)
    x = mean.expand(len(index), 3, size, size).clone().to(device)  # the dataset-mean image

    run = _sample_a if sch.algorithm == "A" else _sample_b
    was_training = model.training
    model.eval()
    try:
        x, steps, batch_steps, levels_run = run(model, x, targets, index, sch, gen, amp_dtype,
                                                callback, tick)
    finally:
        model.train(was_training)
    samples = x.clamp(0, 1).cpu()
    if final is not None:
        got = phi(model, as_uint8(samples), pc.sigma, pc.effective_draws, pc.seed)  # (N, C)
        want = final.cpu()[index]
        err = ((got - want).norm(dim=1) / want.norm(dim=1)).numpy()
    else:
        err = np.full(len(index), np.nan)
    return Reconstruction(
        samples=samples, target_index=index.numpy(),
        phi_target=None if final is None else final.cpu(), phi_rel_error=err,
        seconds=time.perf_counter() - t0, steps=int(steps.sum()), batch_steps=batch_steps,
        levels_run=levels_run, schedule=sch, phi_config=pc, steps_per_sample=steps.numpy())


# ----------------------------------------------------------------------------- targets, output


def load_vector(path: str | Path, dim: int) -> np.ndarray:
    """A (dim,) float32 target from a .npy file (no pickles)."""
    try:
        v = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npy array ({str(e).splitlines()[0]})") from None
    v = np.asarray(v)
    if v.dtype.kind not in "fiu":
        raise ValueError(f"{path}: need a numeric array, got dtype {v.dtype}")
    v = v.astype(np.float32).squeeze()
    if v.shape != (dim,):
        raise ValueError(f"{path}: need shape ({dim},) (the middle block's channels), "
                         f"got {tuple(np.load(path, allow_pickle=False).shape)}")
    return v


def cluster_centroid(doc: dict | None, cluster_id: int) -> np.ndarray:
    """The middle-block centroid of one cluster from the store's "clusters" document."""
    if not doc or not doc.get("clusters"):
        raise LookupError("the collection has no clusters: run idx cluster first")
    for c in doc["clusters"]:
        if int(c.get("id", -2)) == cluster_id:
            if c.get("centroid_mid") is None:
                raise LookupError(f"cluster {cluster_id} has no centroid_mid: run idx cluster "
                                  "again")
            return np.asarray(c["centroid_mid"], np.float32)
    ids = sorted(int(c["id"]) for c in doc["clusters"] if "id" in c)
    shown = ", ".join(map(str, ids[:10])) + (", ..." if len(ids) > 10 else "")
    raise LookupError(f"no cluster {cluster_id}; the collection has {len(ids)} ({shown})")


def thumb_image(payload: dict) -> np.ndarray | None:
    """The stored 64x64 thumbnail of a point, (64, 64, 3) uint8, or None."""
    from PIL import Image

    b64 = payload.get("thumb")
    if not b64:
        return None
    img = Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")
    return np.asarray(img, np.uint8)


def grid(tiles: list[np.ndarray] | np.ndarray, scale: int = 2, cols: int | None = None,
         gap: int = 4):
    """A PIL image of (H, W, 3) uint8 tiles, each scaled `scale`x (NEAREST), in rows of `cols`
    (default: all in one row up to 9), separated by `gap` white pixels."""
    from PIL import Image

    tiles = [np.asarray(t, np.uint8) for t in tiles]
    if not tiles:
        raise ValueError("no tiles")
    cols = cols or min(len(tiles), 9)
    rows = math.ceil(len(tiles) / cols)
    h, w = tiles[0].shape[0] * scale, tiles[0].shape[1] * scale
    out = Image.new("RGB", (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), "white")
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        tile = Image.fromarray(t).resize((w, h), Image.Resampling.NEAREST)
        out.paste(tile, (c * (w + gap), r * (h + gap)))
    return out


def summary(rec: Reconstruction) -> dict:
    """The CLI's --json object (CONTRACT: phi_rel_error, seconds, steps)."""
    err = rec.phi_rel_error
    return {
        "phi_rel_error": [None if np.isnan(e) else round(float(e), 6) for e in err],
        "seconds": round(rec.seconds, 3),
        "steps": rec.steps,
        "batch_steps": rec.batch_steps,
        "levels_run": rec.levels_run,
        "median_phi_rel_error": None if np.isnan(err).all() else float(np.nanmedian(err)),
        "schedule": asdict(rec.schedule),
        "phi": {"sigma": rec.phi_config.sigma, "draws": rec.phi_config.effective_draws,
                "seed": rec.phi_config.seed},
    }
