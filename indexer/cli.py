"""The indexer's commands: train, denoise-eval, embed. Thin: parse -> config -> library call.
Heavy imports (torch) happen inside the commands so `idx --help` stays fast."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Annotated

import typer

from .cli_common import (
    ApiKeyOpt,
    CheckpointOpt,
    CollectionOpt,
    DataOpt,
    DeviceOpt,
    JsonOpt,
    StagedProgress,
    StoreOpt,
    UrlOpt,
    UsageError,
    UserError,
    emit_json,
    progress,
    store_config,
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
    compile: Annotated[bool, typer.Option("--compile/--no-compile")] = False,
    resume: Annotated[str | None, typer.Option(
        "--resume", help="Continue from this checkpoint (e.g. the shipped one); optimizer "
        "state restarts (warm restart) unless OUT already holds a run.")] = None,
    save_every: Annotated[float, typer.Option("--save-every-minutes", min=0.1)] = 3.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    sigma_dist: Annotated[str, typer.Option(
        "--sigma-dist", help="Training noise levels: paper (√σ uniform on [0, 1], SPEC §1) | "
        "uniform (σ uniform: large σ 3x as often).")] = "paper",
) -> None:
    """Train the denoiser on WebDataset shards, or resume the run in OUT.

    Example: idx train --data 'imagenette-train-{000000..000009}.tar' --out runs/s64 --minutes 45
    """
    from .train import SIGMA_DISTS, TrainConfig
    from .train import train as run

    if minutes is None and steps is None:
        raise typer.BadParameter("give --minutes or --steps", param_hint="--minutes")
    if sigma_dist not in SIGMA_DISTS:
        raise typer.BadParameter(f"choose from {', '.join(SIGMA_DISTS)}", param_hint="--sigma-dist")
    cfg = TrainConfig(data=tuple(data), out=out, preset=preset, batch_size=batch_size, lr=lr,
                      halve_every_epochs=halve_every, max_steps=steps, minutes=minutes,
                      workers=workers, seed=seed, test_data=tuple(test_data or ()),
                      save_every_minutes=save_every, device=device, dtype=dtype, compile=compile,
                      init_from=resume, sigma_dist=sigma_dist)
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
    from .train import denoise_eval as run
    from .train import load_images, pick_device

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
    data: Annotated[list[str], typer.Option("--data", help="Shard path, brace pattern, pipe: "
                    "command, or a folder of images (kept in sync); repeatable.")],
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
        "--dataset", help="Dataset name when the shards' folder has no manifest.json; for a "
        "folder, instead of the folder's name.")] = None,
    hash_files: Annotated[bool, typer.Option(
        "--hash", help="Folders: detect changed files by content hash, not size and mtime.")
    ] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print what a sync would do (new, changed, deleted, unchanged files; "
        "shards to index) and change nothing.")] = False,
    watch: Annotated[bool, typer.Option(
        "--watch", help="After the sync, keep watching the folders and sync what changes, one "
        "line (with --json, one JSON object) per sync; Ctrl-C stops after the current batch.")
    ] = False,
    device: DeviceOpt = "auto",
    distributed: Annotated[bool | None, typer.Option(
        "--distributed/--no-distributed", help="One rank per process under torchrun; rank 0 "
        "writes (default: on when torchrun set WORLD_SIZE > 1).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Index shards and folders into the store (embedded Qdrant Edge by default). Rerun to
    resume: finished shards and unchanged files are skipped, unfinished and changed ones are
    redone, and the points of files deleted from a folder are removed.

    Example: idx build --data 'imagenette-train-{000000..000009}.tar'
    Example: idx build --data ~/Pictures --watch
    Several GPUs: torchrun --nproc-per-node 4 -m phisearch.ui build --data ... --json
    """
    from .config import PhiConfig
    from .distributed import launched_by_torchrun, rank
    from .pipeline import BuildConfig
    from .pipeline import build as run

    distributed = launched_by_torchrun() if distributed is None else distributed
    if distributed:
        from .distributed import build_distributed as run

    scfg = store_config(store, qdrant_url, api_key, collection)
    if dry_run and watch:
        raise typer.BadParameter("--dry-run and --watch exclude each other", param_hint="--watch")
    if dry_run:
        from .sync import dry_run as plan_only

        _print_dry_run(plan_only(BuildConfig(data=tuple(data), store=scfg, dataset=dataset,
                                             hash_files=hash_files)), json_out)
        return
    if watch and distributed:
        raise typer.BadParameter("--watch runs in one process", param_hint="--distributed")
    phi = PhiConfig(sigma=sigma, draws=draws, seed=seed, readout=readout or "mid")
    if readout is None:  # the checkpoint's default readout
        from . import checkpoint as ckpt

        phi = PhiConfig(sigma=sigma, draws=draws, seed=seed,
                        readout=ckpt.load(checkpoint).info.get("readout", "mid"))
    cfg = BuildConfig(data=tuple(data), store=scfg, checkpoint=checkpoint, phi=phi,
                      batch_size=batch_size, workers=workers, device=device, dataset=dataset,
                      hash_files=hash_files)
    bar = progress(desc="build", disable=rank() != 0)   # rank 0 reports for all ranks

    def on_progress(p: dict) -> None:
        bar.update(p["batch"])
        bar.set_postfix(written=p["written"], skipped=p["skipped"], refresh=False)

    stop = threading.Event()
    previous = ({sig: signal.getsignal(sig) for sig in STOP_SIGNALS} if distributed
                else _stop_on_signals(stop))
    try:
        if watch:
            from .sync import watch as run_watch

            def on_sync(summary: dict) -> None:
                bar.close()  # the initial sync's bar; later syncs print one line each
                _print_sync(summary, json_out)

            run_watch(cfg, on_sync, on_progress, stop)
            typer.echo("stopped watching; everything synced is stored", err=True)
            return
        summary = run(cfg, on_progress) if distributed else run(cfg, on_progress, stop)
    except KeyboardInterrupt:
        bar.close()
        raise UserError("interrupted: finished shards and files are recorded; rerun the same "
                        "command to resume") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    bar.close()
    if summary is None:   # a distributed rank other than 0: rank 0 prints the summary
        return
    failed = summary.get("shards_failed") or []
    if json_out:
        emit_json(summary)
    else:
        _print_build(summary)
    for f in failed:
        typer.echo(f"error: shard {f['shard']}: {f['reason']} ({f['detail']}); not recorded "
                   "as done", err=True)
    if failed and not summary["indexed"]:
        raise typer.Exit(1)   # nothing indexed and shards that could not be read: a failure


def _print_build(summary: dict) -> None:
    st = summary["stages"]
    typer.echo(f"indexed {summary['indexed']} images in {summary['seconds']:.1f} s "
               f"({summary['img_per_s']:.1f} img/s); collection now holds {summary['points']} "
               f"points", err=True)
    typer.echo(f"stages: decode wait {st['decode_wait_s']} s, phi {st['phi_s']} s "
               f"({st['phi_img_per_s']} img/s), upsert {st['upsert_s']} s "
               f"({st['upsert_points_per_s']} points/s, in the background)", err=True)
    typer.echo(f"shards: {summary['shards_indexed']} indexed, {summary['shards_already_done']} "
               f"already done, {summary['shards_changed']} changed", err=True)
    if summary.get("folders"):
        typer.echo(f"folder files: {summary['new']} new, {summary['changed']} changed, "
                   f"{summary['deleted']} deleted, {summary['unchanged']} unchanged", err=True)
    if summary["skipped"]:
        typer.echo("skipped: " + ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()),
                   err=True)
        for s in summary["skipped_samples"][:20]:
            typer.echo(f"  {s['shard']} {s['key'] or '-'}: {s['reason']} {s['detail']}", err=True)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop_on_signals(stop: threading.Event) -> dict:
    """First Ctrl-C or SIGTERM (docker stop, timeout): finish the current batch, store
    everything, close the store, stop. A second one: abort now. Returns the old handlers."""

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        typer.echo("stopping after the current batch (Ctrl-C again to abort)", err=True)

    return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}


def _print_sync(s: dict, json_out: bool) -> None:
    """One line per sync (watch mode): a JSON object on stdout with --json, else text."""
    if json_out:
        emit_json({k: v for k, v in s.items() if k != "skipped_samples"})
        return
    skipped = ", ".join(f"{k} {v}" for k, v in s["skipped"].items()) or "0"
    typer.echo(f"{time.strftime('%H:%M:%S')} sync: {s['new']} new, {s['changed']} changed, "
               f"{s['deleted']} deleted, {s['unchanged']} unchanged; indexed {s['indexed']}, "
               f"skipped {skipped} in {s['seconds']:.1f} s; {s['points']} points", err=True)


def _print_dry_run(s: dict, json_out: bool) -> None:
    if json_out:
        emit_json(s)
        return
    typer.echo(f"dry run (nothing changed): {s['new']} new, {s['changed']} changed, "
               f"{s['deleted']} deleted, {s['unchanged']} unchanged files; shards: "
               f"{s['shards_to_index']} new, {s['shards_changed']} changed, "
               f"{s['shards_already_done']} done")
    for root, f in s["folders"].items():
        typer.echo(f"  {root} ({f['dataset']}): {f['new']} new, {f['changed']} changed, "
                   f"{f['deleted']} deleted, {f['unchanged']} unchanged")


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
    from .aliases import overview

    st["collections"] = overview(scfg)
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
        typer.echo(f"last run: {_last_run_line(st['last_run'])}")
    if len(st["collections"]) > 1 or any(c["aliases"] for c in st["collections"]):
        typer.echo("collections:")
        for c in st["collections"]:
            alias = f"  (aliases: {', '.join(c['aliases'])})" if c["aliases"] else ""
            typer.echo(f"  {c['name']}: model {str(c['model_sha256'])[:12]} ({c['checkpoint']}), "
                       f"readout {c['readout']}, sigma {c['sigma']}, draws {c['draws']}{alias}")


def _last_run_line(lr: dict) -> str:
    """A build that finished, was interrupted, or never got to its summary (killed)."""
    if "indexed" not in lr:   # only the start-of-run record: killed or still running
        since = time.strftime("%Y-%m-%d %H:%M", time.localtime(lr.get("running_since", 0)))
        return (f"started {since} and did not finish (killed, or still running); "
                f"{len(lr.get('pending', []))} shards were pending: rerun to resume")
    line = f"{lr['indexed']} indexed at {lr.get('img_per_s', 0)} img/s"
    if lr.get("interrupted"):
        line += f", interrupted ({len(lr.get('pending', []))} shards pending: rerun to resume)"
    if lr.get("shards_failed"):
        line += f", {len(lr['shards_failed'])} shards failed"
    return line


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

    Example: idx fit-readout --checkpoint runs/s64/model.safetensors --data 'train-{000000..000009}.tar'
    """
    from . import checkpoint as ckpt
    from .readout import fit_into_checkpoint
    from .shards import expand

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


def export(
    to_url: Annotated[str | None, typer.Option(
        "--to-url", help="Destination: a Qdrant server URL.")] = None,
    to_store: Annotated[str | None, typer.Option(
        "--to-store", help="Destination: another Edge store folder (instead of --to-url).")
    ] = None,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="QDRANT_API_KEY", help="The destination server's API key.")] = None,
    to_collection: Annotated[str | None, typer.Option(
        "--to-collection", help="Destination collection (default: the source's name).")] = None,
    store: StoreOpt = None,
    collection: CollectionOpt = "phisearch",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=4096,
                                            help="Points per page.")] = 256,
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, help="Stop after writing N points (a trial run; rerun resumes).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Copy an Edge collection (points, vectors, payloads, resume records, clusters) into a Qdrant
    server, or another Edge folder. Rerun to resume: points already there are skipped.

    Example: idx export --store ~/.phisearch/store --to-url http://qdrant:6333 --json
    """
    from .export import ExportConfig
    from .export import export as run

    if (to_url is None) == (to_store is None):
        raise typer.BadParameter("give exactly one of --to-url and --to-store",
                                 param_hint="--to-url")
    src = store_config(store, None, None, collection)
    dst = store_config(to_store, to_url, api_key, to_collection or collection)
    bar = progress(desc="export", unit="pt")

    def on_progress(p: dict) -> None:
        bar.total = p["total"]
        bar.update(p["page"])
        bar.set_postfix(written=p["exported"], skipped=p["skipped"], refresh=False)

    try:
        summary = run(ExportConfig(source=src, dest=dst, batch_size=batch_size, limit=limit),
                      on_progress)
    finally:
        bar.close()
    if json_out:
        emit_json(summary)
        return
    state = "done" if summary["complete"] else "stopped at --limit (rerun to continue)"
    typer.echo(f"export {state}: {summary['exported']} points written, "
               f"{summary['skipped_existing']} already there, in {summary['seconds']:.1f} s; "
               f"{summary['destination']} holds {summary['points']} points; docs: "
               f"{', '.join(summary['docs']) or 'none'}", err=True)


def register(app: typer.Typer) -> None:
    app.command("fit-readout")(fit_readout)
    app.command()(train)
    app.command("denoise-eval")(denoise_eval)
    app.command()(embed)
    app.command()(build)
    app.command()(status)
    app.command()(cluster)
    from . import cli_manage

    cli_manage.register(app)
    app.command()(export)


__all__ = ["UserError", "register"]
