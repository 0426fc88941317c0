"""Keeping an index for years: `idx remove`, `idx snapshot create|list|restore`,
`idx alias set|list|delete`."""

from __future__ import annotations

import os
import sys
import time
from typing import Annotated

import typer

from .cli_common import (
    ApiKeyOpt,
    CollectionOpt,
    JsonOpt,
    StoreOpt,
    UrlOpt,
    UsageError,
    UserError,
    emit_json,
    store_config,
    where,
)
from .store import StoreError

YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


def remove(
    key: Annotated[str | None, typer.Option("--key", help="One sample's key.")] = None,
    shard: Annotated[str | None, typer.Option("--shard", help="Every point of a shard "
                                              "(file name or path).")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Every point of a dataset.")
                       ] = None,
    filter_json: Annotated[str | None, typer.Option(
        "--filter", help='A payload filter as JSON, e.g. \'{"label": 3, "split": "train"}\'.')
    ] = None,
    yes: YesOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count, delete nothing.")] = False,
    store: StoreOpt = None,
    qdrant_url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    collection: CollectionOpt = "phisearch",
    json_out: JsonOpt = False,
) -> None:
    """Delete points (and the resume records of their shards, so a later build over the same
    data indexes them again). Asks before deleting unless --yes.

    Example: idx remove --shard imagenette-train-000003.tar --yes
    """
    from .remove import remove as run
    from .remove import selection

    try:
        flt = selection(key, os.path.basename(shard) if shard else None, dataset, filter_json)
    except StoreError as e:   # no selector, or a filter that is not a JSON object: usage
        raise UsageError(str(e)) from None
    scfg = store_config(store, qdrant_url, api_key, collection)

    def confirm(n: int) -> bool:
        if yes:
            return True
        if not sys.stdin.isatty():
            raise UserError(f"{n} points match; pass --yes to delete them without a prompt")
        return typer.confirm(f"delete {n} points from {where(scfg)}?", err=True)

    result = run(scfg, flt, confirm, dry_run=dry_run)
    if json_out:
        emit_json(result)
        return
    if dry_run or not result["deleted"]:
        verb = "would delete" if dry_run else "deleted"
        typer.echo(f"{result['matched']} points match {flt}; {verb} "
                   f"{result['matched'] if dry_run else 0}", err=True)
        return
    typer.echo(f"deleted {result['deleted']} points; {len(result['records_removed'])} shard "
               "records cleared (a build over those shards indexes them again)", err=True)


snapshot_app = typer.Typer(help="Snapshots of a collection (Edge: a tar.gz in the store; "
                           "server: Qdrant's snapshot API).", no_args_is_help=True)


@snapshot_app.command("create")
def snapshot_create(store: StoreOpt = None, qdrant_url: UrlOpt = None, api_key: ApiKeyOpt = None,
                    collection: CollectionOpt = "phisearch", json_out: JsonOpt = False) -> None:
    """Snapshot the collection (refused while a build holds an Edge store).

    Example: idx snapshot create
    """
    from .snapshots import create

    info = create(store_config(store, qdrant_url, api_key, collection))
    if json_out:
        emit_json(info)
        return
    typer.echo(f"snapshot {info['name']}: {info['points']} points, "
               f"{info['bytes'] / 1e6:.1f} MB", err=True)


@snapshot_app.command("list")
def snapshot_list(store: StoreOpt = None, qdrant_url: UrlOpt = None, api_key: ApiKeyOpt = None,
                  collection: CollectionOpt = "phisearch", json_out: JsonOpt = False) -> None:
    """List the collection's snapshots, oldest first."""
    from .snapshots import list_snapshots

    snaps = list_snapshots(store_config(store, qdrant_url, api_key, collection))
    if json_out:
        emit_json({"snapshots": snaps})
        return
    if not snaps:
        typer.echo("no snapshots", err=True)
    for s in snaps:
        when = s["created_at"] if isinstance(s["created_at"], str) else \
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["created_at"]))
        points = s.get("points", "?")
        typer.echo(f"{s['name']}\t{when}\t{points} points\t{(s.get('bytes') or 0) / 1e6:.1f} MB")


@snapshot_app.command("restore")
def snapshot_restore(name: Annotated[str, typer.Argument(help="Snapshot name (idx snapshot list).")],
                     yes: YesOpt = False, store: StoreOpt = None, qdrant_url: UrlOpt = None,
                     api_key: ApiKeyOpt = None, collection: CollectionOpt = "phisearch",
                     json_out: JsonOpt = False) -> None:
    """Replace the collection with a snapshot: the same points, payloads and metadata.

    Example: idx snapshot restore phisearch-20261125T150000-000 --yes
    """
    from .snapshots import restore

    scfg = store_config(store, qdrant_url, api_key, collection)
    if not yes:
        if not sys.stdin.isatty():
            raise UserError("restore replaces the collection; pass --yes to do it without a "
                            "prompt")
        if not typer.confirm(f"replace {where(scfg)} with snapshot {name}?", err=True):
            raise typer.Exit(1)
    info = restore(scfg, name)
    if json_out:
        emit_json(info)
        return
    typer.echo(f"restored {info['collection']} from {name}: {info['points']} points", err=True)


alias_app = typer.Typer(help="Aliases: build a new collection beside the live one, then switch "
                        "a name over.", no_args_is_help=True)


@alias_app.command("set")
def alias_set(alias: Annotated[str, typer.Argument(help="The name queries use.")],
              target: Annotated[str, typer.Argument(help="The collection it should mean.")],
              store: StoreOpt = None, qdrant_url: UrlOpt = None, api_key: ApiKeyOpt = None,
              json_out: JsonOpt = False) -> None:
    """Point ALIAS at collection TARGET; every later open of ALIAS uses TARGET.

    Example: idx alias set phisearch phisearch-v2
    """
    from .aliases import set_alias

    previous = set_alias(store_config(store, qdrant_url, api_key, target), alias, target)
    if json_out:
        emit_json({"alias": alias, "collection": target, "previous": previous})
        return
    typer.echo(f"{alias} -> {target}" + (f" (was {previous})" if previous else ""), err=True)


@alias_app.command("list")
def alias_list(store: StoreOpt = None, qdrant_url: UrlOpt = None, api_key: ApiKeyOpt = None,
               json_out: JsonOpt = False) -> None:
    """List aliases and the collections they point at."""
    from .aliases import list_aliases

    aliases = list_aliases(store_config(store, qdrant_url, api_key, "phisearch"))
    if json_out:
        emit_json({"aliases": aliases})
        return
    for a, c in sorted(aliases.items()):
        typer.echo(f"{a} -> {c}")
    if not aliases:
        typer.echo("no aliases", err=True)


@alias_app.command("delete")
def alias_delete(alias: Annotated[str, typer.Argument()], store: StoreOpt = None,
                 qdrant_url: UrlOpt = None, api_key: ApiKeyOpt = None) -> None:
    """Delete an alias (the collection stays)."""
    from .aliases import delete_alias

    target = delete_alias(store_config(store, qdrant_url, api_key, "phisearch"), alias)
    typer.echo(f"deleted alias {alias} (was -> {target})", err=True)


def register(app: typer.Typer) -> None:
    app.command()(remove)
    app.add_typer(snapshot_app, name="snapshot")
    app.add_typer(alias_app, name="alias")
