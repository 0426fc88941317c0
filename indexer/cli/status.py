"""`idx status`: what a collection holds, for a person (or, with --json, the CONTRACT object)."""

from __future__ import annotations

import os
import time

import typer
from phisearch.indexer.cli.common import (
    ApiKeyOpt,
    CollectionOpt,
    JsonOpt,
    StoreOpt,
    UrlOpt,
    UserError,
    emit_json,
    require_collection,
    store_config,
)

LISTED = 10   # pending shards named one by one; the rest are counted


def status(
    store: StoreOpt = None,
    qdrant_url: UrlOpt = None,
    api_key: ApiKeyOpt = None,
    collection: CollectionOpt = "phisearch",
    json_out: JsonOpt = False,
) -> None:
    """What the collection holds: points, model, shards done and pending, folders, skipped
    samples by reason, the last run, and every collection and alias beside it.

    \b
    Example: idx status --json
    """
    from phisearch.indexer.ingest.summary import status as run
    from phisearch.indexer.manage.aliases import missing_collection, overview

    scfg = store_config(store, qdrant_url, api_key, collection)
    require_collection(scfg)
    st = run(scfg)
    if st is None:
        raise UserError(missing_collection(scfg))
    st["collections"] = overview(scfg)
    if json_out:
        emit_json(st)
        return
    place = f"Qdrant at {scfg.url}" if scfg.url else f"store {scfg.path}"
    for line in status_lines(st, place):
        typer.echo(line)


def status_lines(st: dict, place: str) -> list[str]:
    """The human `idx status`: one fact per line, skipped samples in words with every reason."""
    from phisearch.indexer.sources.records import skip_words

    name = st["collection"]
    if st.get("resolved_collection") not in (None, name):
        name += f" (alias of {st['resolved_collection']})"
    ckpt = st.get("checkpoint") or "?"
    lines = [
        f"collection {name} in {place} ({st['backend']})",
        f"points: {st['points']}",
        (f"model {st['model_sha256'][:12]} ({os.path.basename(str(ckpt)) or ckpt}), readout "
         f"{st['readout']}, sigma {st['sigma']}, draws {st['draws']}, seed {st['seed']}, "
         f"schema v{st['schema_version']}, built on {st.get('device') or 'unrecorded device'}"),
        f"shards: {st['shards_done']} done, {st['shards_pending']} pending",
    ]
    lines += _pending_lines(st)
    if st["folders"]:
        lines.append("folders:")
        for root, f in sorted(st["folders"].items()):
            synced = (time.strftime("%Y-%m-%d %H:%M", time.localtime(f["synced_at"]))
                      if f.get("synced_at") else "never fully synced (rerun idx build)")
            lines.append(f"  {root} (dataset {f.get('dataset')}): {f.get('files', 0)} files "
                         f"indexed, {skip_words(f.get('skipped') or {})}; synced {synced}")
            lines += [f"    {line}" for line in _away_lines(f.get("unavailable") or [])]
    lines.append(f"skipped, all sources: {skip_words(st['skipped'])}")
    lines.append(clustering_line(st.get("clustering")))
    if st.get("last_run"):
        lines.append(f"last run: {last_run_line(st['last_run'])}")
    cols = st.get("collections") or []
    if len(cols) > 1 or any(c["aliases"] for c in cols):
        lines.append("collections:")
        for c in cols:
            alias = f"  (aliases: {', '.join(c['aliases'])})" if c["aliases"] else ""
            lines.append(f"  {c['name']}: model {str(c['model_sha256'])[:12]} "
                         f"({os.path.basename(str(c['checkpoint']))}), readout {c['readout']}, "
                         f"sigma {c['sigma']}, draws {c['draws']}{alias}")
    return lines


def _away_lines(away: list[dict]) -> list[str]:
    """A folder's paths the last sync could not read: their points are kept, never deleted."""
    out = []
    for a in away:
        since = time.strftime("%Y-%m-%d %H:%M", time.localtime(a["since"])) \
            if a.get("since") else "?"
        out.append(f"{a['reason'].upper()} since {since}: {a['path']} ({a['detail']}): "
                   f"{a['kept']} points kept, not deleted; synced again once readable")
    return out


def _pending_lines(st: dict) -> list[str]:
    """The shards the last run left (interrupted, killed, or still running), by name."""
    pending = st.get("pending") or []
    if not pending:
        return []
    last = st.get("last_run") or {}
    if "indexed" not in last:
        why = "the last run did not finish (killed, or still running)"
    elif last.get("interrupted"):
        why = "the last run was interrupted"
    else:
        why = "not indexed yet"
    names = [os.path.basename(u) or u for u in pending[:LISTED]]
    more = f" and {len(pending) - LISTED} more" if len(pending) > LISTED else ""
    return [(f"  pending ({why}; rerun the same idx build to resume): "
             f"{', '.join(names)}{more}")]


def clustering_line(cl: dict | None) -> str:
    """Clusters and noise of the last `idx cluster`, and whether a build made it stale."""
    if cl is None:
        return "clustering: none (run idx cluster)"
    points, noise = cl.get("points") or 0, cl.get("noise") or 0
    line = (f"clustering: {cl['clusters']} clusters, {points - noise} points clustered, {noise} "
            f"noise ({100 * noise / points if points else 0:.0f}%), {cl.get('method')} in "
            f"{cl.get('preprocess')}" + (f" -> {cl['projection']}" if cl.get("projection")
                                        not in (None, "none") else ""))
    if cl.get("stale"):
        line += (f"; STALE: {cl.get('changed_points')} points written or removed since "
                 f"({cl.get('unclustered')} without a cluster): rerun idx cluster")
    return line


def last_run_line(lr: dict) -> str:
    """A build that finished, was interrupted, or never got to its summary (killed)."""
    if "indexed" not in lr:   # only the start-of-run record: killed or still running
        since = time.strftime("%Y-%m-%d %H:%M", time.localtime(lr.get("running_since", 0)))
        return (f"started {since} and did not finish (killed, or still running); "
                f"{len(lr.get('pending', []))} shards were pending: rerun to resume")
    line = f"{lr['indexed']} indexed at {lr.get('img_per_s', 0)} img/s"
    if lr.get("finished_at"):
        line += time.strftime(", finished %Y-%m-%d %H:%M", time.localtime(lr["finished_at"]))
    if lr.get("interrupted"):
        line += f", interrupted ({len(lr.get('pending', []))} shards pending: rerun to resume)"
    if lr.get("shards_failed"):
        failed = ", ".join(os.path.basename(f["shard"]) for f in lr["shards_failed"][:LISTED])
        line += f", {len(lr['shards_failed'])} shards failed ({failed})"
    return line


def register(app: typer.Typer) -> None:
    app.command()(status)
