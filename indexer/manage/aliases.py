"""Collection aliases: build a new collection beside the old one, then switch a name over.

Queries, the UI and `idx serve` open a collection by name; when that name is an alias they get
its target: a command resolves it when it opens the store, and the long-running readers (serve,
the UI) look it up again at every request (store/holder.py), closing the old target's handle
when the alias has moved. So a model or φ upgrade runs without downtime:
`idx build --collection phisearch-v2 ...` builds beside the live collection, which keeps
answering, and `idx alias set phisearch phisearch-v2` switches every later request in one atomic
step (Edge: aliases.json replaced atomically; server: one update_collection_aliases call); each
request answers wholly from one target, with that target's own model (the model cache is keyed
on the collection's identity). tests/test_trust_answers.py runs it with serve and the UI up.
"""

from __future__ import annotations

import os

from phisearch.indexer.store import StoreConfig, backend

OVERVIEW_KEYS = ("checkpoint", "model_sha256", "readout", "sigma", "draws", "seed", "dim",
                 "schema_version", "device")


def list_aliases(cfg: StoreConfig) -> dict[str, str]:
    """{alias: collection} for the store or server."""
    with backend(cfg) as b:
        return b.aliases()


def set_alias(cfg: StoreConfig, alias: str, target: str) -> str | None:
    """Point `alias` at collection `target` (creating or switching it). Returns the previous
    target. Refuses a target that is not a phisearch collection and an alias that would hide
    a real collection."""
    with backend(cfg) as b:
        return b.set_alias(alias, target)


def delete_alias(cfg: StoreConfig, alias: str) -> str:
    """Remove an alias (never a collection). Returns the target it pointed at."""
    with backend(cfg) as b:
        return b.delete_alias(alias)


def overview(cfg: StoreConfig) -> list[dict]:
    """Every collection in the store or server with its model, φ settings and aliases (for
    `idx status`): what a switch would change, read without opening any Edge shard."""
    with backend(cfg) as b:
        aliases, metas = b.aliases(), b.metas()
    return [dict({k: meta.get(k) for k in OVERVIEW_KEYS}, name=name,
                 aliases=sorted(a for a, c in aliases.items() if c == name))
            for name, meta in metas.items()]


def missing_collection(cfg: StoreConfig, consequence: str = "run `idx build --data ...` first"
                       ) -> str:
    """The one-line message for a collection name that is not there: the collections and
    aliases the place does hold, so a mistyped --collection is seen at once."""
    try:
        with backend(cfg) as b:
            cols, aliases, where = sorted(b.collections()), b.aliases(), b.where
    except Exception:  # noqa: BLE001 - the message must not fail; the place itself is the issue
        return f"no collection {cfg.collection} in {cfg.where}: {consequence}"
    if not cols:
        held = "no such folder" if cfg.path and not os.path.isdir(cfg.path) else "it holds none"
        return f"no collection {cfg.collection} in {where} ({held}): {consequence}"
    known = ", ".join(cols)
    if aliases:
        known += "; aliases: " + ", ".join(f"{a} -> {c}" for a, c in sorted(aliases.items()))
    return (f"no collection {cfg.collection} in {where} (known: {known}): check --collection, "
            f"or {consequence}")
