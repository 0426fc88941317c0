"""Collection aliases: build a new collection beside the old one, then switch a name over.

Queries, the UI and `idx serve` open a collection by name; when that name is an alias they get
its target, resolved at open time. So a model or φ upgrade runs without downtime:
`idx build --collection phisearch-v2 ...` builds beside the live collection, which keeps
answering, and `idx alias set phisearch phisearch-v2` switches every later open in one atomic
step.
  Edge:   <store>/aliases.json  {alias: collection}, replaced atomically (tmp + rename)
  Server: Qdrant's own aliases (one atomic update_collection_aliases call)
"""

from __future__ import annotations

from pathlib import Path

from .store import StoreConfig, StoreError, _read_json, _write_json, check_name, edge_collections

ALIASES_FILE = "aliases.json"


def edge_aliases(root: Path) -> dict[str, str]:
    return dict(_read_json(Path(root) / ALIASES_FILE) or {})


def edge_resolve(root: Path, name: str) -> str:
    """A real collection wins; else the alias target; else the name itself (a new collection)."""
    if (Path(root) / name / "meta.json").is_file() or (Path(root) / name / "shard").exists():
        return name
    return edge_aliases(root).get(name, name)


def _client(cfg: StoreConfig):
    from .store_server import ServerStore

    return ServerStore(cfg)


def list_aliases(cfg: StoreConfig) -> dict[str, str]:
    """{alias: collection} for the store or server."""
    if not cfg.url:
        return edge_aliases(Path(cfg.path or ""))
    srv = _client(cfg)
    try:
        with srv._errors("list aliases"):
            res = srv.client.get_aliases()
        return {a.alias_name: a.collection_name for a in res.aliases}
    finally:
        srv.close()


def set_alias(cfg: StoreConfig, alias: str, target: str) -> str | None:
    """Point `alias` at collection `target` (creating or switching it). Returns the previous
    target. Refuses a target that is not a phisearch collection and an alias that would hide
    a real collection."""
    check_name(alias, "alias")
    check_name(target, "collection")
    if alias == target:
        raise StoreError("an alias cannot point at itself")
    if not cfg.url:
        root = Path(cfg.path or "")
        cols = set(edge_collections(root))
        if target not in cols:
            raise StoreError(f"no collection {target} in store {root} (known: "
                             f"{', '.join(sorted(cols)) or 'none'})")
        if alias in cols:
            raise StoreError(f"{alias} is a collection in store {root}; an alias cannot shadow "
                             "it (drop it or pick another alias name)")
        aliases = edge_aliases(root)
        previous = aliases.get(alias)
        aliases[alias] = target
        _write_json(root / ALIASES_FILE, aliases)
        return previous
    from qdrant_client import models

    srv = _client(cfg)
    try:
        if target not in srv.collections():
            raise StoreError(f"no phisearch collection {target} at {cfg.url}")
        previous = list_aliases(cfg).get(alias)
        ops: list = []
        if previous is not None:
            ops.append(models.DeleteAliasOperation(
                delete_alias=models.DeleteAlias(alias_name=alias)))
        ops.append(models.CreateAliasOperation(create_alias=models.CreateAlias(
            collection_name=target, alias_name=alias)))
        with srv._errors("update aliases"):   # one call: the switch is atomic on the server
            srv.client.update_collection_aliases(change_aliases_operations=ops)
        return previous
    finally:
        srv.close()


def delete_alias(cfg: StoreConfig, alias: str) -> str:
    """Remove an alias (never a collection). Returns the target it pointed at."""
    if not cfg.url:
        root = Path(cfg.path or "")
        aliases = edge_aliases(root)
        if alias not in aliases:
            raise StoreError(f"no alias {alias} in store {root}")
        target = aliases.pop(alias)
        _write_json(root / ALIASES_FILE, aliases)
        return target
    from qdrant_client import models

    target = list_aliases(cfg).get(alias)
    if target is None:
        raise StoreError(f"no alias {alias} at {cfg.url}")
    srv = _client(cfg)
    try:
        with srv._errors("delete alias"):
            srv.client.update_collection_aliases(change_aliases_operations=[
                models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias))])
        return target
    finally:
        srv.close()


def overview(cfg: StoreConfig) -> list[dict]:
    """Every collection in the store or server with its model, φ settings and aliases (for
    `idx status`): what a switch would change, read without opening any Edge shard."""
    aliases = list_aliases(cfg)
    keys = ("checkpoint", "model_sha256", "readout", "sigma", "draws", "seed", "dim",
            "schema_version")
    out = []
    if not cfg.url:
        root = Path(cfg.path or "")
        metas = {n: _read_json(root / n / "meta.json") or {} for n in edge_collections(root)}
    else:
        from dataclasses import replace

        from .store_server import ServerStore

        srv = ServerStore(cfg)
        try:
            names = srv.collections()
        finally:
            srv.close()
        metas = {}
        for n in names:
            s = ServerStore(replace(cfg, collection=n))
            try:
                metas[n] = s.meta() or {}
            finally:
                s.close()
    for name, meta in metas.items():
        out.append(dict({k: meta.get(k) for k in keys}, name=name,
                        aliases=sorted(a for a, c in aliases.items() if c == name)))
    return out
