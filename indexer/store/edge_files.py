"""The files of an Edge store folder beside its shards, and the operations on them that need
no shard handle (or only the lock): JSON files replaced atomically, aliases.json, snapshot
archives, and the recovery of a snapshot restore that was killed mid-swap.

  <store>/<collection>/shard/        the EdgeShard (WAL on: survives a crash)
  <store>/<collection>/meta.json     collection metadata (written last: the collection exists)
  <store>/<collection>/.creating     only while the shard is created, before meta.json
  <store>/<collection>/docs/*.json   documents
  <store>/aliases.json               {alias: collection}
  <store>/.locks/<collection>.lock   our lock (lock.py)
  <store>/.snapshots/<collection>/   NAME.tar.gz + NAME.json
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import time
from pathlib import Path

from phisearch.indexer.store.base import SNAPSHOT_DIR, StoreError

log = logging.getLogger(__name__)

ALIASES_FILE = "aliases.json"


def write_json(path: Path, obj: dict) -> None:
    """tmp + fsync + os.replace: readers see the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read {path}: {e}") from e


def collections(root: Path) -> list[str]:
    """The collections of a store folder: sub-folders with a meta.json."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if (d / "meta.json").is_file())


def aliases(root: Path) -> dict[str, str]:
    return dict(read_json(Path(root) / ALIASES_FILE) or {})


def resolve(root: Path, name: str) -> str:
    """A real collection wins; else the alias target; else the name itself (a new collection)."""
    if (Path(root) / name / "meta.json").is_file() or (Path(root) / name / "shard").exists():
        return name
    return aliases(root).get(name, name)


# -- snapshots: tar.gz archives of a collection folder ---------------------------------------

def snapshot_dir(root: Path, collection: str) -> Path:
    return Path(root) / SNAPSHOT_DIR / collection


def write_archive(root: Path, collection: str, points: int, model_sha256: str | None,
                  name: str | None = None) -> dict:
    """Archive the collection folder (its shard closed or flushed by the caller, who holds the
    lock) to .snapshots/<collection>/NAME.tar.gz through a temporary file. A given name is
    never reused (an existing snapshot is not overwritten)."""
    created = time.time()
    name = name or (f"{collection}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(created))}"
                    f"-{int(created * 1000) % 1000:03d}")
    out = snapshot_dir(root, collection)
    if (out / f"{name}.tar.gz").exists():
        raise StoreError(f"snapshot {name} of collection {collection} exists already: pick "
                         "another name (idx snapshot list)")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.tar.gz.tmp"
    # compresslevel 1: the WAL files are mostly preallocated zeros; vectors barely compress.
    with tarfile.open(tmp, "w:gz", compresslevel=1) as tf:
        for item in ("shard", "meta.json", "docs"):
            if (Path(root) / collection / item).exists():
                tf.add(Path(root) / collection / item, arcname=item)
    tmp.rename(out / f"{name}.tar.gz")
    info = {"name": name, "collection": collection, "points": points, "created_at": created,
            "bytes": (out / f"{name}.tar.gz").stat().st_size, "model_sha256": model_sha256}
    write_json(out / f"{name}.json", info)
    return dict(info, path=str(out / f"{name}.tar.gz"))


def list_archives(root: Path, collection: str) -> list[dict]:
    """Snapshots of a collection, oldest first (no lock needed: works during a build)."""
    folder = snapshot_dir(root, collection)
    infos = [json.loads(m.read_text()) for m in sorted(folder.glob("*.json"))
             if (folder / f"{m.stem}.tar.gz").is_file()]
    return sorted(infos, key=lambda i: i["created_at"])


def stage_archive(root: Path, collection: str, name: str) -> Path:
    """Unpack snapshot `name` into a staging folder beside the store; returns it."""
    archive = snapshot_dir(root, collection) / f"{name}.tar.gz"
    if not archive.is_file():
        known = [i["name"] for i in list_archives(root, collection)]
        raise StoreError(f"no snapshot {name} of collection {collection} (known: "
                         f"{', '.join(known) or 'none'})")
    staging = Path(root) / f".restore-{collection}-{time.time_ns()}"
    with tarfile.open(archive, "r:gz") as tf:
        tf.extractall(staging, filter="data")
    return staging


# -- the swap of a restore, journaled ------------------------------------------------------
# A restore swaps the collection folder for a staged one with two renames. It writes a journal
# first, so a process killed between the renames leaves a swap the next open finishes (the
# staged folder was checked to open before the journal was written) or undoes.

def swap_journal(root: Path, name: str) -> Path:
    return Path(root) / f".swap-{name}.json"


def swap_in(root: Path, name: str, staging: Path) -> None:
    """Replace collection `name` by `staging` (caller holds the lock, shard closed)."""
    live = Path(root) / name
    trash = Path(root) / f".trash-{name}-{time.time_ns()}"
    write_json(swap_journal(root, name), {"staging": str(staging), "trash": str(trash)})
    if live.exists():
        live.rename(trash)
    staging.rename(live)
    finish_swap(root, name, interrupted=False)   # drops the journal and the trash


def finish_swap(root: Path, name: str, interrupted: bool = True) -> str | None:
    """Complete or roll back an interrupted swap of collection `name`; returns what was done."""
    journal = swap_journal(root, name)
    job = read_json(journal) if journal.exists() else None
    if job is None:
        return None
    live, staging, trash = Path(root) / name, Path(job["staging"]), Path(job["trash"])
    if not live.exists() and staging.exists():
        staging.rename(live)            # killed between the two renames: roll forward
        done = "finished"
    elif not live.exists() and trash.exists():
        trash.rename(live)              # the staged folder is gone: put the old one back
        done = "rolled back"
    elif staging.exists():
        done = "rolled back"            # killed before the live folder moved: drop the copy
    else:
        done = "completed"
    journal.unlink()
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    if interrupted:
        log.warning("an interrupted snapshot restore of %s was %s", name, done)
    return done


def clean_temporaries(root: Path, name: str) -> list[str]:
    """Remove what killed snapshot operations left for `name`: staged restores, trash folders
    and half-written archives. Only a holder of the lock writes these, so any left are stale."""
    root = Path(root)
    gone = [p for pat in (f".restore-{name}-*", f".trash-{name}-*") for p in root.glob(pat)]
    gone += list(snapshot_dir(root, name).glob(".*.tar.gz.tmp"))
    for p in gone:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if gone:
        log.warning("removed %d stale temporaries of interrupted snapshot operations on %s",
                    len(gone), name)
    return [str(p) for p in gone]
