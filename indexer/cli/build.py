"""`idx build`. Thin: parse -> config -> library call (`idx status` is in status.py)."""

from __future__ import annotations

import signal
import threading
import time
from typing import Annotated

import typer
from phisearch.indexer.cli.common import (
    ApiKeyOpt,
    CheckpointOpt,
    CollectionOpt,
    DeviceOpt,
    JsonOpt,
    StoreOpt,
    UrlOpt,
    UserError,
    emit_json,
    progress,
    store_config,
)


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
        "line per sync (with --json, one JSON object per line: JSON Lines, not one object); "
        "Ctrl-C stops after the current batch.")
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

    \b
    Example: idx build --data 'imagenette-train-{000000..000009}.tar'
    Example: idx build --data ~/Pictures --watch
    Several GPUs: torchrun --nproc-per-node 4 -m phisearch.ui build --data ... --json
    """
    from phisearch.indexer.ingest.distributed import launched_by_torchrun, rank
    from phisearch.indexer.ingest.pipeline import BuildConfig
    from phisearch.indexer.ingest.pipeline import build as run

    distributed = launched_by_torchrun() if distributed is None else distributed
    if distributed:
        from phisearch.indexer.ingest.distributed import build_distributed as run

    scfg = store_config(store, qdrant_url, api_key, collection)
    if dry_run and watch:
        raise typer.BadParameter("--dry-run and --watch exclude each other", param_hint="--watch")
    if dry_run:
        from phisearch.indexer.ingest.watch import dry_run as plan_only

        _print_dry_run(plan_only(BuildConfig(data=tuple(data), store=scfg, dataset=dataset,
                                             hash_files=hash_files)), json_out)
        return
    if watch and distributed:
        raise typer.BadParameter("--watch runs in one process", param_hint="--distributed")
    cfg = BuildConfig(data=tuple(data), store=scfg, checkpoint=checkpoint,
                      phi=_phi_config(checkpoint, sigma, draws, seed, readout),
                      batch_size=batch_size, workers=workers, device=device, dataset=dataset,
                      hash_files=hash_files)
    bar = progress(desc="build", disable=rank() != 0)   # rank 0 reports for all ranks
    summary = _run_build(cfg, run, bar, watch, distributed, json_out)
    _final_postfix(bar, summary)   # the last callback came before the writer drained its queue
    bar.close()
    if summary is None:   # watching ended, or a distributed rank other than 0
        return
    failed = summary.get("shards_failed") or []
    (emit_json if json_out else _print_build)(summary)
    for f in failed:
        typer.echo(f"error: shard {f['shard']}: {f['reason']} ({f['detail']}); not recorded "
                   "as done", err=True)
    if failed and not summary["indexed"]:
        raise typer.Exit(1)   # nothing indexed and shards that could not be read: a failure


def _phi_config(checkpoint: str | None, sigma: float, draws: int, seed: int,
                readout: str | None):
    """φ settings; the readout defaults to the checkpoint's own."""
    from phisearch.indexer.model.config import PhiConfig

    if readout is None:
        from phisearch.indexer.model import checkpoint as ckpt

        readout = ckpt.load(checkpoint).info.get("readout", "mid")
    return PhiConfig(sigma=sigma, draws=draws, seed=seed, readout=readout)


def _run_build(cfg, run, bar, watch: bool, distributed: bool, json_out: bool) -> dict | None:
    """Run the build (or watch) with Ctrl-C / SIGTERM stopping it after the current batch."""

    def on_progress(p: dict) -> None:
        bar.update(p["batch"])
        bar.set_postfix(written=p["written"], skipped=p["skipped"], refresh=False)

    stop = threading.Event()
    previous = ({sig: signal.getsignal(sig) for sig in STOP_SIGNALS} if distributed
                else _stop_on_signals(stop))
    try:
        if watch:
            from phisearch.indexer.ingest.watch import watch as run_watch

            def on_sync(summary: dict) -> None:
                _final_postfix(bar, summary)
                bar.close()  # the initial sync's bar; later syncs print one line each
                _print_sync(summary, json_out)

            run_watch(cfg, on_sync, on_progress, stop)
            typer.echo("stopped watching; everything synced is stored", err=True)
            return None
        return run(cfg, on_progress) if distributed else run(cfg, on_progress, stop)
    except KeyboardInterrupt:
        bar.close()
        raise UserError("interrupted: finished shards and files are recorded; rerun the same "
                        "command to resume") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _final_postfix(bar, summary: dict | None) -> None:
    """The bar's last state shows what was stored: points are written in the background, so
    the per-batch postfix lags behind by up to a queue of batches."""
    if summary is not None and not bar.disable:
        bar.set_postfix(written=summary["indexed"], skipped=sum(summary["skipped"].values()))


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
    kept = sum(f.get("kept", 0) for f in (summary.get("folders") or {}).values())
    for line in unavailable_lines(summary.get("unavailable") or [], kept):
        typer.echo(line, err=True)
    if summary["skipped"]:
        typer.echo("skipped: " + ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()),
                   err=True)
        for s in summary["skipped_samples"][:20]:
            typer.echo(f"  {s['shard']} {s['key'] or '-'}: {s['reason']} {s['detail']}", err=True)


def unavailable_lines(away: list[dict], kept: int | None = None) -> list[str]:
    """Folder paths that could not be read (the first listed): their points were kept, not
    deleted. `kept`: the total, when more paths were found than listed."""
    if not away:
        return []
    kept = sum(a["kept"] for a in away) if kept is None else kept
    lines = [(f"kept {kept} points under paths that could not be read (not deleted; synced "
              "again once readable):")]
    lines += [f"  {a['reason']}: {a['path']}: {a['detail']} ({a['kept']} points kept)"
              for a in away[:20]]
    if len(away) > 20:
        lines.append(f"  and {len(away) - 20} more (--json lists them)")
    return lines


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
    away = s.get("unavailable") or []
    kept = (f"; kept {sum(a['kept'] for a in away)} points of unreadable paths: "
            + ", ".join(f"{a['path']} ({a['reason']})" for a in away[:5])) if away else ""
    typer.echo(f"{time.strftime('%H:%M:%S')} sync: {s['new']} new, {s['changed']} changed, "
               f"{s['deleted']} deleted, {s['unchanged']} unchanged; indexed {s['indexed']}, "
               f"skipped {skipped} in {s['seconds']:.1f} s; {s['points']} points{kept}",
               err=True)


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
        for line in unavailable_lines(f.get("unavailable") or []):
            typer.echo("  " + line)


def register(app: typer.Typer) -> None:
    app.command()(build)
