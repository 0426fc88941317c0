"""The read side's commands: eval, reconstruct, analyze, serve (query: cli_query.py). Heavy
imports inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from phisearch.indexer.cli.common import (
    ApiKeyOpt,
    CheckpointOpt,
    CollectionOpt,
    DeviceOpt,
    JsonOpt,
    StagedProgress,
    StoreOpt,
    UrlOpt,
    UserError,
    check_device,
    emit_json,
    store_config,
    warn_if_missing,
    where,
)


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise typer.BadParameter(f"a comma-separated list of numbers, got {text!r}",
                                 param_hint=what) from None


def eval_cmd(
    queries: Annotated[list[str], typer.Option(
        "--queries", help="Query shards (held-out split); path or brace pattern, repeatable.")],
    gallery: Annotated[list[str], typer.Option(
        "--gallery", help="Gallery shards (training split); also where unstored whitenings are "
        "fitted. Repeatable.")],
    checkpoint: Annotated[str | None, typer.Option(
        "--checkpoint", help="A .safetensors file or a built-in name.")] = None,
    readout: Annotated[str | None, typer.Option(
        "--readout", help="Readout of `phi`: mid | blocks | mid+white64 | blocks+white64 ... "
        "(default: the checkpoint's, else mid).")] = None,
    readouts: Annotated[str, typer.Option(
        "--readouts", help="Readouts compared for the trained and the untrained network "
        "(comma-separated).")] = "mid,blocks,mid+white64,blocks+white64,blocks+white64+l2,blocks+white128+l2",
    limit_queries: Annotated[int | None, typer.Option("--limit-queries", min=1)] = None,
    limit_gallery: Annotated[int | None, typer.Option("--limit-gallery", min=1)] = None,
    queries_per_class: Annotated[int | None, typer.Option(
        "--queries-per-class", min=1, help="Queries: N of each class, in shard order.")] = None,
    queries_skip_per_class: Annotated[int, typer.Option(
        "--queries-skip-per-class", min=0, help="... after skipping M of each class (a "
        "disjoint validation subset).")] = 0,
    gallery_per_class: Annotated[int | None, typer.Option(
        "--gallery-per-class", min=1, help="Gallery: N of each class, in shard order.")] = None,
    sigma: Annotated[float | None, typer.Option(
        "--sigma", min=0, help="σ of `phi` (default: the checkpoint's, else 0.2).")] = None,
    phi_draws: Annotated[int | None, typer.Option(
        "--phi-draws", min=1, help="Draws of `phi` (default: the checkpoint's, else 4).")] = None,
    sweep: Annotated[bool, typer.Option(
        "--sweep", help="Also score φ at other (σ, draws) settings, --sigmas x --draws: one φ "
        "pass each (about 5 min each on the 13k-image held-out sets on a CPU).")] = False,
    sigmas: Annotated[str | None, typer.Option(
        "--sigmas", help="The sweep's σ values, comma-separated (implies --sweep; default "
        "0.1,0.2,0.4).")] = None,
    draws: Annotated[str | None, typer.Option(
        "--draws", help="The sweep's draws, crossed with --sigmas (implies --sweep; default "
        "1,4).")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    device: DeviceOpt = "auto",
    cache: Annotated[Path | None, typer.Option(
        "--cache", help="Folder to keep and reuse each pass's vectors (keyed by model, images, "
        "σ, draws, seed, device).")] = None,
    json_out: JsonOpt = False,
    out: Annotated[Path | None, typer.Option("--out", help="Also write the JSON here.")] = None,
    markdown: Annotated[Path | None, typer.Option(
        "--markdown", help="Also write the markdown table here.")] = None,
) -> None:
    """Retrieval (kNN, p@10, mAP) and clustering (NMI, ARI, purity) of φ beside its baselines:
    raw and 16x16 pixels, the same network untrained, the paper's readout, σ = 0; with --sweep
    also other (σ, draws). Vectors are computed from the shards; no index is needed.

    \b
    Example: idx eval --queries imagenette-test-000000.tar \\
      --gallery 'imagenette-train-{000000..000004}.tar' --json

    \f
    (Over 80 lines because its 24 options are its signature; the work is search.evaluate.)
    """
    import json

    from phisearch.indexer.model.embedder import pick_device

    from . import evaluate as ev

    extra = ()
    if sweep or sigmas is not None or draws is not None:
        extra = tuple((s, int(d))
                      for s in _floats("0.1,0.2,0.4" if sigmas is None else sigmas, "--sigmas")
                      for d in _floats("1,4" if draws is None else draws, "--draws"))
    if any(d < 1 for _, d in extra) or any(s < 0 for s, _ in extra):
        raise typer.BadParameter("σ must be >= 0 and draws >= 1", param_hint="--sigmas/--draws")
    settings = ev.EvalSettings(
        sigma=sigma, draws=phi_draws, seed=seed, extra=extra,
        readouts=tuple(r for r in readouts.replace(" ", "").split(",") if r),
        limit_queries=limit_queries, limit_gallery=limit_gallery, batch_size=batch_size,
        queries_per_class=queries_per_class, queries_skip_per_class=queries_skip_per_class,
        gallery_per_class=gallery_per_class,
        device=str(pick_device(device)), cache_dir=str(cache) if cache else None)
    with StagedProgress(lambda stage: "step" if stage == "score" else "img") as on_progress:
        result = ev.evaluate(checkpoint, list(queries), list(gallery), readout, settings,
                             on_progress)
    from .eval_report import markdown as to_markdown

    for w in result["warnings"]:
        typer.echo(f"warning: {w}", err=True)
    table = to_markdown(result)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(table)
    if json_out:
        emit_json(result)
    else:
        typer.echo(table)


def reconstruct(
    out: Annotated[Path, typer.Option("--out", help="Where to write the PNG grid.")],
    image: Annotated[Path | None, typer.Option(
        "--image", help="Target image file (σ-matched mode; needs no store).")] = None,
    point_id: Annotated[str | None, typer.Option("--id", help="Target: a stored point.")] = None,
    key: Annotated[str | None, typer.Option("--key", help="Target: a stored sample key.")] = None,
    cluster: Annotated[int | None, typer.Option(
        "--cluster", help="Target: a cluster centroid (after idx cluster).")] = None,
    vector: Annotated[Path | None, typer.Option(
        "--vector", help="Target: a .npy of middle-block means, shape (C,).")] = None,
    n: Annotated[int, typer.Option("-n", "--samples", min=1, max=64,
                                   help="Samples to draw.")] = 8,
    schedule: Annotated[str, typer.Option(
        "--schedule", help="Preset: fast | paper | adaptive (Algorithm B).")] = "fast",
    levels: Annotated[int | None, typer.Option("--levels", min=1,
                                               help="Override: noise levels.")] = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", min=0, help="Override: Adam steps per level (0 = unguided).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Override: Adam step size.")] = None,
    renoise: Annotated[str | None, typer.Option(
        "--renoise", help="Override, algorithm A: fresh | ancestral | ddim (how each level "
        "re-noises; ancestral draws images even unguided).")] = None,
    sigma_max: Annotated[float | None, typer.Option(
        "--sigma-max", help="Override: the first noise level (fast: 5; from 1 samples stay "
        "grey).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same samples.")] = 0,
    dataset: Annotated[str | None, typer.Option("--dataset", help="With --key.")] = None,
    checkpoint: CheckpointOpt = None,
    store: StoreOpt = None,
    qdrant_url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    collection: CollectionOpt = "phisearch",
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Draw images whose φ matches a target (SPEC §4): what the samples share is what φ encodes.

    --image and --vector use --checkpoint (default: the shipped model) and need no store;
    --id, --key and --cluster read the collection and use its model and φ settings.

    \b
    Example: idx reconstruct --image photo.jpg -n 8 --out grid.png --json

    \f
    (Over 80 lines because its 23 options are its signature; the body resolves the target in
    _file_target / _stored_target.)
    """
    from phisearch.indexer.cli.common import progress
    from phisearch.indexer.model.embedder import Embedder

    from . import query as q
    from . import reconstruct as rc

    given = [x is not None for x in (image, point_id, key, cluster, vector)]
    if sum(given) != 1:
        raise typer.BadParameter("give exactly one of --image, --id, --key, --cluster, --vector")
    try:
        sch = rc.schedule(schedule, levels=levels, inner_steps=steps, lr=lr, renoise=renoise,
                          sigma_max=sigma_max)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--schedule") from None
    if out.suffix.lower() != ".png":
        raise typer.BadParameter(f"{out}: the grid is written as PNG", param_hint="--out")

    if image is not None or vector is not None:
        emb = Embedder.create(checkpoint, device=device)
        first, target_images, target = _file_target(image, vector, emb)
    else:
        scfg = store_config(store, qdrant_url, api_key, collection)
        meta, target, first = _stored_target(scfg, point_id, key, cluster, dataset)
        emb = q.embedder_for(meta if checkpoint is None else {**meta, "checkpoint": checkpoint},
                             device, where(scfg))
        if target.shape != (emb.checkpoint.model.mid_channels,):
            raise UserError(f"stored vector has {target.shape[0]} channels, the model "
                            f"{emb.checkpoint.model.mid_channels}")
        target_images = None
    bar = progress(sch.levels, desc="reconstruct", unit="level")

    def on_level(p: dict) -> None:
        bar.update(1)
        bar.set_postfix(sigma=f"{p['sigma']:.3f}", loss=f"{p['loss']:.2e}")

    try:
        rec = rc.reconstruct(emb.checkpoint.model, target, images=target_images, n=n, sch=sch,
                             seed=seed, phi_config=emb.phi, callback=on_level)
    except ValueError as e:
        raise UserError(str(e)) from None
    finally:
        bar.close()
    tiles = ([first] if first is not None else []) + list(rec.images())
    out.parent.mkdir(parents=True, exist_ok=True)
    rc.grid(tiles).save(out)
    result = rc.summary(rec)
    result.update(out=str(out), checkpoint=emb.checkpoint.name, model_sha256=emb.checkpoint.sha256,
                  target_shown=first is not None)
    if json_out:
        emit_json(result)
        return
    errs = ", ".join(f"{e:.3f}" for e in rec.phi_rel_error)
    typer.echo(f"wrote {out}: {n} samples in {rec.seconds:.1f} s, {rec.steps} guidance steps; "
               f"relative φ error {errs}")


def _file_target(image: Path | None, vector: Path | None, emb):
    """(image shown first, target images, target vector) from --image or --vector."""
    from phisearch.indexer.sources import images

    from . import reconstruct as rc
    from .cli_query import _check_image_path

    if image is not None:
        _check_image_path(image)
        try:
            first = images.decode(image.read_bytes())
        except images.BadImage as e:
            raise UserError(f"{image}: {e}") from None
        return first, first[None], None
    if not vector.is_file():
        raise UserError(f"no such file: {vector}")
    try:
        return None, None, rc.load_vector(vector, emb.checkpoint.model.mid_channels)
    except ValueError as e:
        raise UserError(str(e)) from None


def _stored_target(scfg, point_id: str | None, key: str | None, cluster: int | None,
                   dataset: str | None):
    """(collection meta, target middle-block means, the point's thumbnail or None) from
    --id, --key or --cluster."""
    from phisearch.indexer.store import CLUSTERS_DOC, open_store

    from . import query as q
    from . import reconstruct as rc

    with open_store(scfg) as st:
        try:
            meta = q.require_meta(st)
            if cluster is not None:
                return meta, rc.cluster_centroid(st.get_doc(CLUSTERS_DOC), cluster), None
            t = (q.target_from_key(st, key, meta["sparse_dim"], dataset) if key is not None
                 else q.target_from_id(st, point_id, meta["sparse_dim"]))
            hits = st.retrieve([t.id], with_vectors=False)
            return meta, t.mid, rc.thumb_image(hits[0].payload) if hits else None
        except (q.NotFound, LookupError) as e:
            raise UserError(str(e)) from None


def analyze(
    data: Annotated[list[str], typer.Option(
        "--data", help="Shard path or brace pattern, repeatable (the first --images are used).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the PNGs and report.html.")],
    checkpoint: CheckpointOpt = None,
    images: Annotated[int, typer.Option("--images", min=2, help="Images analysed.")] = 512,
    sigma: Annotated[float, typer.Option(
        "--sigma", min=0, help="σ of the main pass and σ1 of the stability sweep.")] = 0.2,
    draws: Annotated[int, typer.Option("--draws", min=1, help="Noisy copies per σ.")] = 1,
    stability_images: Annotated[int, typer.Option(
        "--stability-images", min=2, help="Images used by the σ2 sweep.")] = 128,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """The paper's analyses (SPEC §3) on any checkpoint: sparsity per block, stability across
    noise, channel selectivity, union of subspaces; PNGs plus a self-contained report.html.

    \b
    Example: idx analyze --data imagenette-test-000000.tar --images 256 --out docs/analyze
    """

    from . import analyze as an

    cfg = an.AnalyzeConfig(images=images, sigma=sigma, draws=draws, seed=seed,
                           stability_images=stability_images)
    with StagedProgress(lambda s: "img" if s == "blocks" else "σ") as on_progress:
        result = an.analyze(checkpoint, list(data), out, cfg, on_progress)
    if json_out:
        emit_json(result)
        return
    pm = result["pr_mean"]
    typer.echo("mean PR in -> out: " + ", ".join(
        f"{b} {pm[b + '.in']:.2f}->{pm[b + '.out']:.2f}" for b in an.BLOCKS), err=True)
    typer.echo(f"wrote {', '.join(result['files'])} to {out} in {result['seconds']} s", err=True)


def serve(
    store: StoreOpt = None,
    qdrant_url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    collection: CollectionOpt = "phisearch",
    host: Annotated[str, typer.Option(
        "--host", help="Interface to listen on (127.0.0.1: this machine only; 0.0.0.0 in a "
        "container).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    device: Annotated[str, typer.Option(
        "--device", callback=check_device,
        help="cpu | cuda | auto, for uploads' φ (cpu = what idx query computes).")] = "cpu",
    max_bytes: Annotated[int, typer.Option(
        "--max-bytes", min=1, help="Largest request body; larger ones get 413.")
    ] = 20 * 1024 * 1024,
    busy_wait: Annotated[float, typer.Option(
        "--busy-wait", min=0, help="Edge: seconds a request waits for a store held by another "
        "process (idx build) before answering 503 busy.")] = 1.0,
    hold: Annotated[float, typer.Option(
        "--hold", min=0, help="Edge: idle seconds serve keeps the store open at most (default: "
        "until another process such as idx build asks for it, which gets it within a second; "
        "0: open and close per request).")] = float("inf"),
) -> None:
    """Serve φ and search over HTTP (FastAPI): GET /healthz, POST /phi, POST /search.
    Uploads are embedded with the collection's own model and φ settings (checked against the
    collection: a checkpoint changed since the build gets 503, and /healthz says so). With an
    Edge store, serve keeps the collection open between requests and hands it over when
    another process (idx build) asks; requests meanwhile get 503 busy. An alias (--collection
    live) is looked up on every request, so `idx alias set` switches a running serve.

    \b
    Example: idx serve --store ~/.phisearch/store --port 8000
    (then: curl -F file=@photo.jpg 'http://127.0.0.1:8000/search?k=5')
    """
    import uvicorn

    from .serve import create_app

    scfg = store_config(store, qdrant_url, api_key, collection)
    warn_if_missing(scfg, "/healthz answers 503 until idx build has run")
    app = create_app(scfg, device=device, max_bytes=max_bytes, busy_wait=busy_wait,
                     hold_s=hold)
    typer.echo(f"phisearch serve: http://{host}:{port}  ({where(scfg)}; Ctrl-C to stop)",
               err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


def register(app: typer.Typer) -> None:
    from .cli_query import query

    app.command()(query)
    app.command()(serve)
    app.command()(reconstruct)
    app.command("eval")(eval_cmd)
    app.command()(analyze)
