"""`idx train`, `idx denoise-eval`, `idx fit-readout`, `idx embed`: the model side.
Thin: parse -> config -> library call; torch is imported inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from phisearch.indexer.cli.common import (
    CheckpointOpt,
    DataOpt,
    DeviceOpt,
    JsonOpt,
    UsageError,
    emit_json,
    progress,
)


def train(
    data: DataOpt,
    out: Annotated[str, typer.Option("--out", help="Output folder; rerun to resume.")],
    preset: Annotated[str, typer.Option("--preset", help="paper64 | small64 | tiny")] = "small64",
    minutes: Annotated[float | None, typer.Option("--minutes", min=0)] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=0, help="Total steps to reach.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    lr: Annotated[float, typer.Option("--lr", min=0)] = 1e-3,
    halve_every: Annotated[float, typer.Option(
        "--halve-every-epochs", min=0.001, help="Halve the lr every N epochs.")] = 100.0,
    test_data: Annotated[list[str] | None, typer.Option(
        "--test-data", help="Shard(s) for periodic PSNR.")] = None,
    workers: Annotated[int, typer.Option("--workers", min=0)] = 1,
    device: DeviceOpt = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto | fp32 | bf16")] = "auto",
    compile: Annotated[bool | None, typer.Option(
        "--compile/--no-compile", help="torch.compile the network (default: on CUDA, and on "
        "a CPU for runs of 10+ minutes: --minutes, or the steps left at the probed "
        "speed).")] = None,
    resident: Annotated[bool, typer.Option(
        "--resident/--no-resident", help="Decode the training set once and keep it on the "
        "device (GPU: no decode or copy per step).")] = False,
    eval_every: Annotated[float, typer.Option(
        "--eval-every-minutes", min=0.1, help="Periodic PSNR interval.")] = 10.0,
    resume: Annotated[str | None, typer.Option(
        "--resume", help="Continue from this checkpoint (e.g. the shipped one); optimizer "
        "state restarts (warm restart) unless OUT already holds a run.")] = None,
    save_every: Annotated[float, typer.Option("--save-every-minutes", min=0.1)] = 3.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    sigma_dist: Annotated[str, typer.Option(
        "--sigma-dist", help="Training noise levels: paper (√σ uniform on [0, 1], SPEC §1) | "
        "uniform (σ uniform: large σ 3x as often) | focus (a third each: paper, [0.1, 0.4] "
        "where φ is read, [0.6, 1]) | wide (a quarter each: focus's three and log-uniform "
        "[1, 5], where the default reconstruction starts).")] = "paper",
    lr_schedule: Annotated[str, typer.Option(
        "--lr-schedule", help="halve (halve every --halve-every-epochs, SPEC) | cosine | linear "
        "(decay to 0 over --schedule-steps from this run's first step).")] = "halve",
    warmup_steps: Annotated[int, typer.Option(
        "--warmup-steps", min=0, help="Linear lr warm-up steps (useful for a warm start).")] = 0,
    schedule_steps: Annotated[int | None, typer.Option(
        "--schedule-steps", min=1, help="cosine/linear: the planned run length in steps, "
        "counted from the step the run (or warm start) began.")] = None,
    resolution: Annotated[int, typer.Option(
        "--resolution", help="Train on images area-downscaled to this side (64 or 32).")] = 64,
    ema: Annotated[float, typer.Option(
        "--ema", min=0.0, max=0.99999, help="Also keep a moving average of the weights with "
        "this decay (e.g. 0.999: about the last 1,000 steps) in OUT/ema.safetensors; 0: none.")
    ] = 0.0,
) -> None:
    """Train the denoiser on WebDataset shards, or resume the run in OUT.

    \b
    Example: idx train --data 'imagenette-train-{000000..000009}.tar' --out runs/s64 --minutes 45
    """
    from phisearch.indexer.train.loop import TrainConfig
    from phisearch.indexer.train.loop import train as run

    _check_recipe(minutes, steps, sigma_dist, resolution, lr_schedule, lr, warmup_steps,
                  schedule_steps)
    cfg = TrainConfig(data=tuple(data), out=out, preset=preset, batch_size=batch_size, lr=lr,
                      halve_every_epochs=halve_every, max_steps=steps, minutes=minutes,
                      workers=workers, seed=seed, test_data=tuple(test_data or ()),
                      save_every_minutes=save_every, device=device, dtype=dtype, compile=compile,
                      init_from=resume, sigma_dist=sigma_dist, resident=resident,
                      eval_every_minutes=eval_every, ema=ema, lr_schedule=lr_schedule,
                      warmup_steps=warmup_steps, schedule_steps=schedule_steps,
                      resolution=resolution)
    bar = progress(total=steps, desc="train", unit="step")

    def on_progress(p: dict) -> None:
        bar.n = p["step"]
        bar.set_postfix(loss=f"{p['loss']:.1f}", img_s=f"{p['img_per_s']:.1f}",
                        lr=f"{p['lr']:.1e}", epoch=f"{p['epoch']:.2f}", refresh=False)
        bar.refresh()

    try:
        path = run(cfg, on_progress)
    finally:
        bar.close()
    typer.echo(f"checkpoint: {path}", err=True)


def _check_recipe(minutes: float | None, steps: int | None, sigma_dist: str, resolution: int,
                  lr_schedule: str, lr: float, warmup_steps: int,
                  schedule_steps: int | None) -> None:
    """Usage errors of `idx train` before anything loads (exit 2, the option named)."""
    from phisearch.indexer.train.schedule import SIGMA_DISTS, LrSchedule

    if minutes is None and steps is None:
        raise typer.BadParameter("give --minutes or --steps", param_hint="--minutes")
    if sigma_dist not in SIGMA_DISTS:
        raise typer.BadParameter(f"choose from {', '.join(SIGMA_DISTS)}", param_hint="--sigma-dist")
    if resolution not in (16, 32, 64):
        raise typer.BadParameter("choose 64, 32 or 16", param_hint="--resolution")
    try:
        LrSchedule(lr_schedule, lr, warmup_steps, schedule_steps)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--lr-schedule") from None


def denoise_eval(
    data: DataOpt,
    checkpoint: CheckpointOpt = None,
    images: Annotated[int, typer.Option("--images", min=1, help="Test images used.")] = 512,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """PSNR (dB) of the noisy input, the denoiser and the best Gaussian blur, per σ.

    \b
    Example: idx denoise-eval --data imagenette-test-000000.tar --json
    """
    from phisearch.indexer.model import checkpoint as ckpt
    from phisearch.indexer.model.embedder import pick_device
    from phisearch.indexer.sources.shards import expand
    from phisearch.indexer.train.denoise_eval import denoise_eval as run
    from phisearch.indexer.train.loop import load_images

    c = ckpt.load(checkpoint, pick_device(device))
    table = run(c.model, load_images(expand(data), images), seed=seed)
    result = {"checkpoint": str(c.path), "model_sha256": c.sha256, "images": images,
              "sigmas": table}
    if json_out:
        emit_json(result)
        return
    typer.echo(f"checkpoint {c.path} ({images} images)")
    typer.echo(f"{'sigma':>6} {'noisy':>8} {'denoised':>9} {'blur':>8}")
    for s, row in table.items():
        typer.echo(f"{s:>6} {row['noisy']:8.2f} {row['denoised']:9.2f} {row['baseline']:8.2f}")


def embed(
    data: DataOpt,
    out: Annotated[str, typer.Option("--out", help="Output .npz (keys, labels, phi).")],
    checkpoint: CheckpointOpt = None,
    sigma: Annotated[float, typer.Option("--sigma", min=0)] = 0.2,
    draws: Annotated[int, typer.Option("--draws", min=1)] = 4,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    workers: Annotated[int, typer.Option("--workers", min=0)] = 1,
    device: DeviceOpt = "auto",
) -> None:
    """Compute φ for every sample of the shards and write keys, labels and φ to an .npz.

    \b
    Example: idx embed --data imagenette-mini-000000.tar --out mini.npz
    """
    from phisearch.indexer.ingest.embed_npz import embed_shards

    if not out.endswith(".npz"):
        raise typer.BadParameter("the output must end in .npz", param_hint="--out")
    bar = progress(desc="embed")
    summary = embed_shards(data, out, checkpoint=checkpoint, sigma=sigma, draws=draws, seed=seed,
                           batch_size=batch_size, workers=workers, device=device,
                           on_batch=bar.update)
    bar.close()
    skipped = ", ".join(f"{k}: {v}" for k, v in summary["skipped"].items()) or "none"
    typer.echo(f"wrote {summary['count']} vectors to {out} (skipped {skipped})", err=True)


def fit_readout(
    data: DataOpt,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="Checkpoint to extend "
                                            "(its .safetensors file is rewritten in place).")],
    readout: Annotated[str, typer.Option("--readout", help="mid | blocks")] = "blocks",
    dims: Annotated[list[int], typer.Option(
        "--dims", min=1, help="PCA dimensions kept; repeat to fit several from one pass (the "
        "first becomes the default).")] = [64],  # noqa: B006 - typer reads the default
    sigma: Annotated[float, typer.Option("--sigma", min=0)] = 0.2,
    draws: Annotated[int, typer.Option("--draws", min=1)] = 4,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    limit: Annotated[int | None, typer.Option("--limit", min=10, help="Images used.")] = None,
    default: Annotated[bool, typer.Option("--default/--no-default",
                                          help="Make it the checkpoint's default readout.")] = True,
    l2: Annotated[bool, typer.Option("--l2/--no-l2", help="L2-normalize after whitening "
                                     "(readout label ends in +l2).")] = False,
    sqrt: Annotated[bool, typer.Option("--sqrt/--no-sqrt", help="Square-root the means before "
                                       "whitening (label NAME+sqrt+whiteK).")] = False,
    out: Annotated[str | None, typer.Option(
        "--out", help="Write a new checkpoint here (a .safetensors path that does not exist) "
        "instead of rewriting CHECKPOINT; required for a built-in checkpoint.")] = None,
) -> None:
    """Fit a whitened readout (PCA to DIMS, unit variance) on training shards and store it in
    the checkpoint; the weights and the model's sha256 stay the same.

    \b
    Example: idx fit-readout --checkpoint runs/s64/model.safetensors --data 'train-{000000..000009}.tar'
    """
    from phisearch.indexer.model import checkpoint as ckpt
    from phisearch.indexer.sources.shards import expand
    from phisearch.indexer.train.fit_readout import fit_into_checkpoint

    src = ckpt.resolve(checkpoint)
    if out is None and src.resolve().parent == ckpt.BUILTIN_DIR.resolve():
        raise UsageError(f"{checkpoint} is a checkpoint shipped inside phisearch; pass --out "
                         "NEW.safetensors to write a copy with the readout")
    if out is not None and (not out.endswith(".safetensors") or Path(out).exists()):
        raise UsageError(f"--out must name a new .safetensors file ({out} "
                         f"{'exists' if Path(out).exists() else 'does not end in .safetensors'})")
    bar = progress(desc="fit-readout")
    label = fit_into_checkpoint(str(src), expand(data), readout, dims, sigma, draws, seed,
                                limit, default, on_batch=bar.update, l2=l2,
                                sqrt=sqrt, out=out)
    bar.close()
    typer.echo(f"stored readout {label} in {out or src}", err=True)


def register(app: typer.Typer) -> None:
    app.command()(train)
    app.command("denoise-eval")(denoise_eval)
    app.command("fit-readout")(fit_readout)
    app.command()(embed)
