"""Operations on a built collection: `idx cluster`, `idx export`, `idx remove`,
`idx snapshot create|list|restore`, `idx alias set|list|delete`."""

from __future__ import annotations

import os
import sys
import time
from typing import Annotated

import typer
from phisearch.indexer.cli.common import (
    ApiKeyOpt,
    CollectionOpt,
    JsonOpt,
    StagedProgress,
    StoreOpt,
    UrlOpt,
    UsageError,
    UserError,
    emit_json,
    progress,
    store_config,
    where,
)
from phisearch.indexer.store import StoreError

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

    \b
    Example: idx remove --shard imagenette-train-000003.tar --yes
    """
    from phisearch.indexer.manage.remove import remove as run
    from phisearch.indexer.manage.remove import selection

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
                           "server: Qdrant's snapshot API).", no_args_is_help=True,
                           rich_markup_mode=None)   # plain help, as ui/cli.py says why


@snapshot_app.command("create")
def snapshot_create(name: Annotated[str | None, typer.Argument(
                        metavar="NAME", help="The snapshot's name (default: COLLECTION-UTC time; Edge only: a "
                        "Qdrant server names its snapshots).")] = None,
                    store: StoreOpt = None, qdrant_url: UrlOpt = None, api_key: ApiKeyOpt = None,
                    collection: CollectionOpt = "phisearch", json_out: JsonOpt = False) -> None:
    """Snapshot the collection (refused while a build holds an Edge store).

    \b
    Example: idx snapshot create before-upgrade
    """
    from phisearch.indexer.manage.snapshots import create

    info = create(store_config(store, qdrant_url, api_key, collection), name)
    if json_out:
        emit_json(info)
        return
    typer.echo(f"snapshot {info['name']}: {info['points']} points, "
               f"{info['bytes'] / 1e6:.1f} MB", err=True)


@snapshot_app.command("list")
def snapshot_list(store: StoreOpt = None, qdrant_url: UrlOpt = None, api_key: ApiKeyOpt = None,
                  collection: CollectionOpt = "phisearch", json_out: JsonOpt = False) -> None:
    """List the collection's snapshots, oldest first."""
    from phisearch.indexer.manage.snapshots import list_snapshots

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
def snapshot_restore(name: Annotated[str, typer.Argument(
                         metavar="NAME", help="Snapshot name (idx snapshot list).")],
                     yes: YesOpt = False, store: StoreOpt = None, qdrant_url: UrlOpt = None,
                     api_key: ApiKeyOpt = None, collection: CollectionOpt = "phisearch",
                     json_out: JsonOpt = False) -> None:
    """Replace the collection with a snapshot: the same points, payloads and metadata.

    \b
    Example: idx snapshot restore phisearch-20261125T150000-000 --yes
    """
    from phisearch.indexer.manage.snapshots import restore

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
                        "a name over.", no_args_is_help=True, rich_markup_mode=None)


@alias_app.command("set")
def alias_set(alias: Annotated[str, typer.Argument(metavar="ALIAS",
                                                   help="The name queries use.")],
              target: Annotated[str, typer.Argument(metavar="TARGET",
                                                    help="The collection it should mean.")],
              store: StoreOpt = None, qdrant_url: UrlOpt = None, api_key: ApiKeyOpt = None,
              json_out: JsonOpt = False) -> None:
    """Point ALIAS at collection TARGET; every later open of ALIAS uses TARGET. An alias
    never shadows a collection, so give the live name to an alias from the start:

    \b
    Example:
      idx build --collection photos-v1 --data ~/Pictures
      idx alias set photos photos-v1
      idx build --collection photos-v2 --data ~/Pictures --checkpoint new.safetensors
      idx alias set photos photos-v2
    (then idx query, idx serve and idx ui with --collection photos use photos-v2)
    """
    from phisearch.indexer.manage.aliases import set_alias

    previous = set_alias(store_config(store, qdrant_url, api_key, target), alias, target)
    if json_out:
        emit_json({"alias": alias, "collection": target, "previous": previous})
        return
    typer.echo(f"{alias} -> {target}" + (f" (was {previous})" if previous else ""), err=True)


@alias_app.command("list")
def alias_list(store: StoreOpt = None, qdrant_url: UrlOpt = None, api_key: ApiKeyOpt = None,
               json_out: JsonOpt = False) -> None:
    """List aliases and the collections they point at."""
    from phisearch.indexer.manage.aliases import list_aliases

    aliases = list_aliases(store_config(store, qdrant_url, api_key, "phisearch"))
    if json_out:
        emit_json({"aliases": aliases})
        return
    for a, c in sorted(aliases.items()):
        typer.echo(f"{a} -> {c}")
    if not aliases:
        typer.echo("no aliases", err=True)


@alias_app.command("delete")
def alias_delete(alias: Annotated[str, typer.Argument(metavar="ALIAS",
                                                      help="The alias to remove.")],
                 store: StoreOpt = None, qdrant_url: UrlOpt = None, api_key: ApiKeyOpt = None,
                 json_out: JsonOpt = False) -> None:
    """Delete an alias (the collection stays).

    \b
    Example: idx alias delete photos --json
    """
    from phisearch.indexer.manage.aliases import delete_alias

    target = delete_alias(store_config(store, qdrant_url, api_key, "phisearch"), alias)
    if json_out:
        emit_json({"alias": alias, "deleted": True, "collection": target})
        return
    typer.echo(f"deleted alias {alias} (was -> {target})", err=True)


def cluster(
    method: Annotated[str, typer.Option(
        "--method", help="hdbscan (finds the number of clusters, marks noise) | kmeans.")
    ] = "hdbscan",
    min_cluster_size: Annotated[int | None, typer.Option(
        "--min-cluster-size", min=2, help="HDBSCAN: smallest cluster [default: points/250, "
        "between 5 and 50].")] = None,
    min_samples: Annotated[int | None, typer.Option(
        "--min-samples", min=1, help="HDBSCAN: density smoothing (1 = least noise).")] = 1,
    selection: Annotated[str, typer.Option(
        "--selection", help="HDBSCAN cluster selection: eom (fewer, larger) | leaf (many "
        "small).")] = "eom",
    k: Annotated[int, typer.Option("--k", min=1, help="k-means: number of clusters.")] = 100,
    preprocess: Annotated[str, typer.Option(
        "--preprocess", help="auto (l2 for a whitened readout, else pca) | raw | l2 | pca: "
        "the space clusters are found in.")] = "auto",
    pca_dims: Annotated[int, typer.Option("--pca-dims", min=1, help="Dimensions kept by pca.")
                        ] = 32,
    projection: Annotated[str, typer.Option(
        "--projection", help="auto (umap for hdbscan, none for kmeans) | none | umap: the "
        "low-dimensional space clusters are found in.")] = "auto",
    proj_dims: Annotated[int, typer.Option(
        "--proj-dims", min=1, help="Dimensions of the projection.")] = 10,
    neighbors: Annotated[int, typer.Option(
        "--neighbors", min=2, help="UMAP neighbours per point.")] = 30,
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
    Default: HDBSCAN (eom) in a 10-d UMAP projection, which finds the number of clusters
    itself and leaves points in no dense region as noise (cluster_id -1; measured on the
    imagenette index: docs/results.md); k-means labels them all.

    \b
    Example: idx cluster --method kmeans --k 50 --json
    """
    from phisearch.indexer.manage.cluster import (
        METHODS,
        PREPROCESS,
        PROJECTIONS,
        SELECTIONS,
        ClusterConfig,
    )
    from phisearch.indexer.manage.cluster import cluster as run

    if method not in METHODS:
        raise typer.BadParameter(f"use {' or '.join(METHODS)}", param_hint="--method")
    if preprocess not in PREPROCESS:
        raise typer.BadParameter(f"use {', '.join(PREPROCESS)}", param_hint="--preprocess")
    if selection not in SELECTIONS:
        raise typer.BadParameter(f"use {' or '.join(SELECTIONS)}", param_hint="--selection")
    if projection not in PROJECTIONS:
        raise typer.BadParameter(f"use {', '.join(PROJECTIONS)}", param_hint="--projection")
    cfg = ClusterConfig(method=method, min_cluster_size=min_cluster_size,
                        min_samples=min_samples, selection=selection, k=k,
                        preprocess=preprocess, pca_dims=pca_dims, projection=projection,
                        proj_dims=proj_dims, neighbors=neighbors,
                        sample_above=sample_above, seed=seed)
    scfg = store_config(store, qdrant_url, api_key, collection)
    with StagedProgress(lambda s: "pt" if s == "fit" else "img") as on_progress:
        result = run(scfg, cfg, on_progress)
    if json_out:
        emit_json(result)
        return
    space = result["preprocess"] + (f" -> {result['projection']}"
                                    if result["projection"] != "none" else "")
    typer.echo(f"{result['method']} on {result['points']} points ({space}): "
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

    \b
    Example: idx export --store ~/.phisearch/store --to-url http://qdrant:6333 --json
    """
    from phisearch.indexer.manage.export import ExportConfig
    from phisearch.indexer.manage.export import export as run

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
    app.command()(cluster)
    app.command()(export)
    app.command()(remove)
    app.add_typer(snapshot_app, name="snapshot")
    app.add_typer(alias_app, name="alias")
