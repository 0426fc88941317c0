"""`idx remove`: delete points and the resume records that claim them.

A resume record says "this shard (or file) is fully indexed". After removing some of its points
that is no longer true, so the record goes too: the next `idx build` over the same data indexes
that shard again (deterministic ids: nothing is duplicated), while a removal the user wants to
keep simply means not building that data again.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable

from phisearch.indexer.manage.aliases import missing_collection
from phisearch.indexer.sources.folders import doc_name
from phisearch.indexer.sources.shards import shard_key
from phisearch.indexer.store import SHARDS_DOC, StoreConfig, StoreError, open_store, parse_filter
from phisearch.indexer.store.base import PAYLOAD_KEYS


def selection(key: str | None = None, shard: str | None = None, dataset: str | None = None,
              filter_json: str | None = None) -> dict:
    """The CLI's selectors as one payload filter (all given conditions must hold)."""
    flt: dict = {}
    if filter_json:
        try:
            flt = json.loads(filter_json)
        except ValueError as e:
            raise StoreError(f"--filter is not valid JSON: {e}") from None
        if not isinstance(flt, dict):
            raise StoreError('--filter takes a JSON object, e.g. {"label": 3}')
    for name, value in (("key", key), ("shard", shard), ("dataset", dataset)):
        if value is not None:
            flt[name] = value
    if shard is not None and "/" in shard:   # a path names one shard: its resolved path
        del flt["shard"]
        flt["shard_url"] = shard_key(shard)
    if not flt:
        raise StoreError("say what to remove: --key, --shard, --dataset or --filter")
    unknown = sorted(set(flt) - set(PAYLOAD_KEYS))
    if unknown:   # a typo would match nothing (or, negated by nothing, everything): refuse it
        raise StoreError(f"--filter: unknown payload key(s) {', '.join(unknown)} (keys: "
                         f"{', '.join(PAYLOAD_KEYS)})")
    parse_filter(flt)   # a malformed filter fails here, before anything is counted or deleted
    return flt


def remove(cfg: StoreConfig, flt: dict, confirm: Callable[[int], bool] = lambda n: True,
           dry_run: bool = False) -> dict:
    """Delete the points matching `flt` after `confirm(count)` agrees; drop their
    resume records (a shard's, or a folder file's). Returns {"matched", "deleted",
    "records_removed": [shard urls and folder/relpath]}."""
    with open_store(cfg) as store:
        if store.meta() is None:
            raise StoreError(missing_collection(cfg, "nothing to remove"))
        if not dry_run:   # refused now if another writer holds it, not after the confirmation
            store.claim_write()
        shard_urls: set[str] = set()
        folder_keys: dict[str, set[str]] = defaultdict(set)   # folder root -> relpaths
        matched = 0
        for hit in store.scroll(flt):
            matched += 1
            url = hit.payload.get("shard_url") or hit.payload.get("shard")
            if hit.payload.get("path") and url:   # a folder source keeps one record per file
                folder_keys[url].add(hit.payload["key"])
            elif url:
                shard_urls.add(url)
        if isinstance(flt.get("shard"), str) and len(shard_urls) > 1:
            raise StoreError(f"--shard {flt['shard']} names {len(shard_urls)} shards in different "
                             f"folders ({', '.join(sorted(shard_urls))}): give its path")
        result = {"matched": matched, "deleted": 0, "records_removed": [],
                  "collection": store.name}
        if dry_run or matched == 0 or not confirm(matched):
            return result
        records = store.get_doc(SHARDS_DOC) or {}
        # Points written before records were keyed by resolved path carry the path as typed:
        # match on the resolved path too, and on the file name (clearing one record too many
        # only makes a later build index that shard again; never the other way round).
        names = {os.path.basename(u) for u in shard_urls if not os.path.isabs(u)}
        keys = shard_urls | {shard_key(u) for u in shard_urls}
        gone = sorted(u for u in records if u in keys or os.path.basename(u) in names)
        # Records first: an interruption after this leaves data to re-index, never a record
        # that claims points which are gone.
        if gone:
            store.put_doc(SHARDS_DOC, {u: r for u, r in records.items() if u not in gone})
        for root, keys in folder_keys.items():
            doc = store.get_doc(doc_name(root))
            if doc is not None:
                dropped = [k for k in keys if doc.get("files", {}).pop(k, None) is not None]
                store.put_doc(doc_name(root), doc)
                gone.extend(f"{root}/{k}" for k in sorted(dropped))
        result["deleted"] = store.delete(filter=flt)
        result["records_removed"] = gone
        return result
