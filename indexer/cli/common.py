"""What every layer's commands share: option types, JSON output, progress bars, and the error
rule (exit 1 with one line, no traceback unless --debug; exit 2 for usage)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

DEBUG = {"on": False}


class UserError(Exception):
    """A problem the user can fix: printed as one line, exit 1."""


class UsageError(UserError):
    """The command line itself is wrong (a missing selector, a value outside its choices):
    printed as one line, exit 2, as Typer's own usage errors."""


def check_device(ctx: typer.Context, name: str) -> str:
    """--device callback: a usage error (exit 2, one line) before anything is loaded, for a
    name that is no device and, when the command is about to run, for cuda where torch sees
    none (embedder.device_problem: the check and words pick_device uses). A command line that is
    only parsed (tests/test_deploy.py parses the compose file's `--device cuda` on hosts without
    a GPU) is not checked for CUDA: the group has then invoked no subcommand."""
    if name in ("auto", "cpu"):
        return name
    from phisearch.indexer.model.embedder import device_problem

    running = ctx.parent is not None and ctx.parent.invoked_subcommand is not None
    problem = device_problem(name, here=running)
    if problem:
        raise typer.BadParameter(problem)
    return name


def default_store() -> str:
    return os.environ.get("PHISEARCH_STORE", str(Path.home() / ".phisearch" / "store"))


DataOpt = Annotated[list[str], typer.Option("--data", help="Shard path, brace pattern "
                    "(train-{000000..000009}.tar) or pipe: command; repeatable.")]
CheckpointOpt = Annotated[str | None, typer.Option(
    "--checkpoint", help="A .safetensors file or a built-in name (default: the shipped model).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda",
                                         callback=check_device)]
StoreOpt = Annotated[str | None, typer.Option(
    "--store", help="Embedded Qdrant Edge store folder (default $PHISEARCH_STORE or "
    "~/.phisearch/store).")]
UrlOpt = Annotated[str | None, typer.Option(
    "--qdrant-url", envvar="QDRANT_URL", help="A Qdrant server URL instead of the embedded store.")]
ApiKeyOpt = Annotated[str | None, typer.Option(
    "--api-key", envvar="QDRANT_API_KEY", help="Qdrant server API key.")]
CollectionOpt = Annotated[str, typer.Option("--collection", help="Collection name.")]


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def progress(total: int | None = None, desc: str = "", unit: str = "img", disable: bool = False):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=disable or os.environ.get("PHISEARCH_NO_PROGRESS") == "1",
                smoothing=0.1)


def store_config(store: str | None, qdrant_url: str | None, api_key: str | None,
                 collection: str, **kw):
    """CLI flags -> StoreConfig: a server URL wins; else the Edge folder (default documented)."""
    from phisearch.indexer.store import StoreConfig

    if qdrant_url:
        return StoreConfig(url=qdrant_url, api_key=api_key, collection=collection, **kw)
    return StoreConfig(path=store or default_store(), collection=collection, **kw)


def where(cfg) -> str:
    return cfg.where


def warn_if_missing(cfg: Any, consequence: str) -> None:
    """A long-running reader started before its collection exists: say so, once (an alias
    counts; nothing is opened, so a running build is not disturbed)."""
    from phisearch.indexer.store import StoreError, backend

    try:
        with backend(cfg) as place:
            if place.has(cfg.collection):
                return
            where_ = place.where
    except StoreError as e:
        typer.echo(f"warning: {e}", err=True)
        return
    typer.echo(f"warning: no collection {cfg.collection} in {where_} yet; {consequence}",
               err=True)


def require_collection(cfg: Any) -> None:
    """A reading command's collection must exist: else one line naming the collections and
    aliases that do (nothing is opened, so a mistyped --store creates no folder)."""
    from phisearch.indexer.manage.aliases import missing_collection
    from phisearch.indexer.store import backend

    with backend(cfg) as place:
        if place.has(cfg.collection):
            return
    raise UserError(missing_collection(cfg))


class StagedProgress:
    """One progress bar per stage for library callbacks shaped (stage, done, total): a new bar
    opens when the stage changes. Use as a context manager so the last bar is closed."""

    def __init__(self, unit_for=lambda stage: "img"):
        self.unit_for = unit_for
        self.stage: str | None = None
        self.bar = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.close()
            self.bar = progress(total=total, desc=stage, unit=self.unit_for(stage))
            self.stage = stage
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> StagedProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
