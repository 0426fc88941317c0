"""`idx query`: nearest neighbours from an image file, a key or an id, in the terminal or as
JSON. Heavy imports inside the command (`idx --help` loads no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from phisearch.indexer.cli.common import (
    ApiKeyOpt,
    CollectionOpt,
    DeviceOpt,
    JsonOpt,
    StoreOpt,
    UrlOpt,
    UsageError,
    UserError,
    emit_json,
    require_collection,
    store_config,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1   # Qdrant's integer payloads (store.INT64_*)


def query(
    image: Annotated[Path | None, typer.Argument(
        metavar="IMAGE", help="An image file to search with.")] = None,
    key: Annotated[str | None, typer.Option("--key", help="Search from an indexed sample.")] = None,
    point_id: Annotated[str | None, typer.Option("--id", help="Search from a point id.")] = None,
    k: Annotated[int, typer.Option("-k", "--limit", min=1, max=1000)] = 10,
    label: Annotated[int | None, typer.Option("--label", help="Only hits with this label.")] = None,
    cluster: Annotated[int | None, typer.Option("--cluster", help="Only this cluster.")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset")] = None,
    explain: Annotated[bool, typer.Option("--explain", help="Channels behind each match.")] = False,
    store: StoreOpt = None,
    qdrant_url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    collection: CollectionOpt = "phisearch",
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Top-k nearest images by φ distance (Euclidean), from an image file, a key or an id.

    \b
    Example: idx query photo.jpg -k 5 --json
    """
    from phisearch.indexer.sources import images
    from phisearch.indexer.store import open_store

    from . import query as q

    if sum(x is not None for x in (image, key, point_id)) != 1:
        raise typer.BadParameter("give exactly one of IMAGE, --key, --id")
    for name, value in (("--label", label), ("--cluster", cluster)):
        if value is not None and not INT64_MIN <= value <= INT64_MAX:
            raise UsageError(f"{name} {value} is out of range: Qdrant integers are 64-bit")
    if image is not None:
        _check_image_path(image)
    scfg = store_config(store, qdrant_url, api_key, collection)
    require_collection(scfg)
    flt = {k_: v for k_, v in (("label", label), ("cluster_id", cluster), ("dataset", dataset))
           if v is not None}
    with open_store(scfg) as st:
        try:
            meta = q.require_meta(st)
            if image is not None:
                target = q.target_from_image(image.read_bytes(),
                                             q.embedder_for(meta, device, st.where))
            elif key is not None:
                target = q.target_from_key(st, key, meta["sparse_dim"], dataset)
            else:
                target = q.target_from_id(st, point_id, meta["sparse_dim"])
        except images.BadImage as e:
            raise UserError(f"{image}: {e}") from None
        except q.NotFound as e:
            raise UserError(str(e)) from None
        hits = q.search(st, target, k, flt or None)
        rows = [q.hit_json(h) for h in hits]
        why_empty = q.why_no_match(st, flt) if not hits and flt else None
        if explain and hits:
            full = {h.id: h for h in st.retrieve([h.id for h in hits], with_vectors=True)}
            for row in rows:
                other = q.target_from_hit(full[row["id"]], meta["sparse_dim"])
                row["explain"] = q.explain(target.mid, other.mid)
    if json_out:
        out = {"hits": rows, "query": {"image": str(image) if image else None, "key": key,
                                       "id": point_id, "filter": flt}}
        if why_empty:
            out["why_empty"] = why_empty
        emit_json(out)
        return
    if not rows:
        typer.echo(f"no hits: {why_empty}" if why_empty else "no hits")
    for i, r in enumerate(rows, 1):
        typer.echo(q.hit_line(i, r))
        if explain:
            ex = r["explain"]
            drivers = ", ".join(f"c{d['channel']} {d['share']:.0%}" for d in ex["drivers"][:4])
            shared = ", ".join(f"c{d['channel']}" for d in ex["shared"][:6])
            typer.echo(f"       drivers: {drivers}; shared: {shared}")


def _check_image_path(image: Path) -> None:
    """A query image that is not a file, said plainly (a folder is searched by its files)."""
    if image.is_dir():
        raise UserError(f"{image} is a directory: give one image file (to index a folder, "
                        f"idx build --data {image})")
    if not image.is_file():
        raise UserError(f"no such image file: {image}")
