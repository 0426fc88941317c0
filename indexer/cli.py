"""The indexer's commands: train, denoise-eval, embed. Thin: parse -> config -> library call.
Heavy imports (torch) happen inside the commands so `idx --help` stays fast."""

from __future__ import annotations

from typing import Annotated

import typer

from .cli_common import (StagedProgress, ApiKeyOpt, CheckpointOpt, CollectionOpt, DataOpt, DeviceOpt, JsonOpt,
                         StoreOpt, UrlOpt, UserError, emit_json, progress, store_config)


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
    compile: Annotated[bool, typer.Option("--compile/--no-compile")] = False,
    resume: Annotated[str | None, typer.Option(
        "--resume", help="Continue from this checkpoint (e.g. the shipped one); optimizer "
        "state restarts (warm restart) unless OUT already holds a run.")] = None,
    save_every: Annotated[float, typer.Option("--save-every-minutes", min=0.1)] = 3.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Train the denoiser on WebDataset shards, or resume the run in OUT.

    Example: idx train --data 'imagenette-train-{000000..000009}.tar' --out runs/s64 --minutes 45
    """
    from .train import TrainConfig, train as run

    if minutes is None and steps is None:
        raise typer.BadParameter("give --minutes or --steps", param_hint="--minutes")
    cfg = TrainConfig(data=tuple(data), out=out, preset=preset, batch_size=batch_size, lr=lr,
                      halve_every_epochs=halve_every, max_steps=steps, minutes=minutes,
                      workers=workers, seed=seed, test_data=tuple(test_data or ()),
                      save_every_minutes=save_every, device=device, dtype=dtype, compile=compile,
                      init_from=resume)
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


def denoise_eval(
    data: DataOpt,
    checkpoint: CheckpointOpt = None,
    images: Annotated[int, typer.Option("--images", min=1, help="Test images used.")] = 512,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """PSNR (dB) of the noisy input, the denoiser and the best Gaussian blur, per σ.

    Example: idx denoise-eval --data imagenette-test-000000.tar --json
    """
    from . import checkpoint as ckpt
    from .shards import expand
    from .train import denoise_eval as run, load_images, pick_device

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

    Example: idx embed --data imagenette-mini-000000.tar --out mini.npz
    """
    from .embed import embed_shards

    if not out.endswith(".npz"):
        raise typer.BadParameter("the output must end in .npz", param_hint="--out")
    bar = progress(desc="embed")
    summary = embed_shards(data, out, checkpoint=checkpoint, sigma=sigma, draws=draws, seed=seed,
                           batch_size=batch_size, workers=workers, device=device,
                           on_batch=bar.update)
    bar.close()
    skipped = ", ".join(f"{k}: {v}" for k, v in summary["skipped"].items()) or "none"
    typer.echo(f"wrote {summary['count']} vectors to {out} (skipped {skipped})", err=True)


def build(
    data: DataOpt,
    store: StoreOpt = None,
    qdrant_url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    collection: CollectionOpt = "phisearch",
    checkpoint: CheckpointOpt = None,
    sigma: Annotated[float, typer.Option("--sigma", min=0, help="φ noise level.")] = 0.2,
    draws: Annotated[int, typer.Option("--draws", min=1, help="Noisy copies per image.")] = 4,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    readout: Annotated[str | None, typer.Option(
        "--readout", help="Dense vector readout (default: the checkpoint's).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Decoding processes.")] = 1,
    dataset: Annotated[str | None, typer.Option(
        "--dataset", help="Dataset name when the shards' folder has no manifest.json.")] = None,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Index shards into the store (embedded Qdrant Edge by default). Rerun to resume: finished
    shards are skipped, unfinished and changed ones are redone.

    Example: idx build --data 'imagenette-train-{000000..000009}.tar'
    """
    from .config import PhiConfig
    from .pipeline import BuildConfig, build as run

    scfg = store_config(store, qdrant_url, api_key, collection)
    phi = PhiConfig(sigma=sigma, draws=draws, seed=seed, readout=readout or "mid")
    if readout is None:  # the checkpoint's default readout
        from . import checkpoint as ckpt

        phi = PhiConfig(sigma=sigma, draws=draws, seed=seed,
                        readout=ckpt.load(checkpoint).info.get("readout", "mid"))
    cfg = BuildConfig(data=tuple(data), store=scfg, checkpoint=checkpoint, phi=phi,
                      batch_size=batch_size, workers=workers, device=device, dataset=dataset)
    bar = progress(desc="build")

    def on_progress(p: dict) -> None:
        bar.update(p["batch"])
        bar.set_postfix(written=p["written"], skipped=p["skipped"], refresh=False)

    try:
        summary = run(cfg, on_progress)
    except KeyboardInterrupt:
        bar.close()
        raise UserError("interrupted: finished shards are recorded; rerun the same command "
                        "to resume") from None
    bar.close()
    if json_out:
        emit_json(summary)
        return
    st = summary["stages"]
    typer.echo(f"indexed {summary['indexed']} images in {summary['seconds']:.1f} s "
               f"({summary['img_per_s']:.1f} img/s); collection now holds {summary['points']} "
               f"points", err=True)
    typer.echo(f"stages: decode wait {st['decode_wait_s']} s, phi {st['phi_s']} s "
               f"({st['phi_img_per_s']} img/s), upsert {st['upsert_s']} s "
               f"({st['upsert_points_per_s']} points/s, in the background)", err=True)
    typer.echo(f"shards: {summary['shards_indexed']} indexed, {summary['shards_already_done']} "
               f"already done, {summary['shards_changed']} changed", err=True)
    if summary["skipped"]:
        typer.echo("skipped: " + ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()),
                   err=True)
        for s in summary["skipped_samples"][:20]:
            typer.echo(f"  {s['shard']} {s['key'] or '-'}: {s['reason']} {s['detail']}", err=True)


def status(
    store: StoreOpt = None,
    qdrant_url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    collection: CollectionOpt = "phisearch",
    json_out: JsonOpt = False,
) -> None:
    """What the collection holds: points, shards done, skipped samples, settings, last run.

    Example: idx status --json
    """
    from .cli_common import where
    from .pipeline import status as run

    scfg = store_config(store, qdrant_url, api_key, collection)
    st = run(scfg)
    if st is None:
        raise UserError(f"no collection in {where(scfg)}: run `idx build --data ...` first")
    if json_out:
        emit_json(st)
        return
    typer.echo(f"collection {collection} in {where(scfg)} ({st['backend']})")
    typer.echo(f"points: {st['points']}   shards done: {st['shards_done']}   "
               f"skipped: {sum(st['skipped'].values())} {st['skipped'] or ''}")
    typer.echo(f"model {st['model_sha256'][:12]} ({st['checkpoint']}), readout {st['readout']}, "
               f"sigma {st['sigma']}, draws {st['draws']}, seed {st['seed']}, "
               f"schema v{st['schema_version']}")
    if st.get("last_run"):
        lr = st["last_run"]
        typer.echo(f"last run: {lr['indexed']} indexed at {lr['img_per_s']} img/s")


def fit_readout(
    data: DataOpt,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="Checkpoint to extend "
                                            "(its .safetensors file is rewritten in place).")],
    readout: Annotated[str, typer.Option("--readout", help="mid | blocks")] = "blocks",
    dims: Annotated[int, typer.Option("--dims", min=1, help="PCA dimensions kept.")] = 64,
    sigma: Annotated[float, typer.Option("--sigma", min=0)] = 0.2,
    draws: Annotated[int, typer.Option("--draws", min=1)] = 4,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    limit: Annotated[int | None, typer.Option("--limit", min=10, help="Images used.")] = None,
    default: Annotated[bool, typer.Option("--default/--no-default",
                                          help="Make it the checkpoint's default readout.")] = True,
) -> None:
    """Fit a whitened readout (PCA to DIMS, unit variance) on training shards and store it in
    the checkpoint; the weights and the model's sha256 stay the same.

    Example: idx fit-readout --checkpoint runs/s64/model.safetensors --data 'train-{000000..000009}.tar'
    """
    from .readout import fit_into_checkpoint
    from .shards import expand

    bar = progress(desc="fit-readout")
    label = fit_into_checkpoint(checkpoint, expand(data), readout, dims, sigma, draws, seed,
                                limit, default, on_batch=bar.update)
    bar.close()
    typer.echo(f"stored readout {label} in {checkpoint}", err=True)


def cluster(
    method: Annotated[str, typer.Option(
        "--method", help="hdbscan (finds the number of clusters, marks noise) | kmeans.")
    ] = "hdbscan",
    min_cluster_size: Annotated[int, typer.Option(
        "--min-cluster-size", min=2, help="HDBSCAN: smallest cluster.")] = 10,
    min_samples: Annotated[int | None, typer.Option(
        "--min-samples", min=1, help="HDBSCAN: density smoothing (1 = least noise).")] = 1,
    selection: Annotated[str, typer.Option(
        "--selection", help="HDBSCAN cluster selection: leaf (many small) | eom (few large).")
    ] = "leaf",
    k: Annotated[int, typer.Option("--k", min=1, help="k-means: number of clusters.")] = 100,
    preprocess: Annotated[str, typer.Option(
        "--preprocess", help="auto (l2 for a whitened readout, else pca) | raw | l2 | pca: "
        "the space clusters are found in.")] = "auto",
    pca_dims: Annotated[int, typer.Option("--pca-dims", min=1, help="Dimensions kept by pca.")
                        ] = 32,
    sample_above: Annotated[int, typer.Option(
        "--sample-above", min=2, help="Above this many points, fit on a random sample of this "
        "size and assign the rest.")] = 20000,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    store: StoreOpt = None,
    qdrant_url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    collection: CollectionOpt = "phisearch",
    json_out: JsonOpt = False,
) -> None:
    """Cluster the stored φ vectors and write cluster_id / cluster_prob to every point (re-running
    replaces them); the summary (centroids, exemplars, channels) goes to the collection's docs.

    Example: idx cluster --method kmeans --k 50 --json
    """
    from .cluster import METHODS, PREPROCESS, SELECTIONS, ClusterConfig
    from .cluster import cluster as run

    if method not in METHODS:
        raise typer.BadParameter(f"use {' or '.join(METHODS)}", param_hint="--method")
    if preprocess not in PREPROCESS:
        raise typer.BadParameter(f"use {', '.join(PREPROCESS)}", param_hint="--preprocess")
    if selection not in SELECTIONS:
        raise typer.BadParameter(f"use {' or '.join(SELECTIONS)}", param_hint="--selection")
    cfg = ClusterConfig(method=method, min_cluster_size=min_cluster_size,
                        min_samples=min_samples, selection=selection, k=k,
                        preprocess=preprocess, pca_dims=pca_dims,
                        sample_above=sample_above, seed=seed)
    scfg = store_config(store, qdrant_url, api_key, collection)
    with StagedProgress(lambda s: "pt" if s == "fit" else "img") as on_progress:
        result = run(scfg, cfg, on_progress)
    if json_out:
        emit_json(result)
        return
    typer.echo(f"{result['method']} on {result['points']} points ({result['preprocess']}): "
               f"{result['clusters']} clusters, {result['noise']} noise, "
               f"{result['seconds']:.1f} s", err=True)
    sizes = result["sizes"]
    if sizes:
        typer.echo(f"sizes: largest {sizes[:10]}{' ...' if len(sizes) > 10 else ''}", err=True)


def register(app: typer.Typer) -> None:
    app.command("fit-readout")(fit_readout)
    app.command()(train)
    app.command("denoise-eval")(denoise_eval)
    app.command()(embed)
    app.command()(build)
    app.command()(status)
    app.command()(cluster)


__all__ = ["register", "UserError"]
