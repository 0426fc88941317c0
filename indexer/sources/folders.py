"""A folder of your own images as a source for `idx build`: walked lazily, kept in sync.

The walk runs inside the DataLoader workers (no pre-scan: the first batch starts after
`batch_size` decodes, however many files the folder holds). Each file is compared with the
folder's record (relpath -> fingerprint, kept in a store doc): unchanged files are counted and
passed over, new and changed ones decoded by `images.decode` (the same function as shards and
uploads), and recorded files that are gone are reported as deleted at the end of the walk.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from phisearch.indexer.sources import images
from phisearch.indexer.sources.records import FileEvent, Fingerprint, Sample, Skip

log = logging.getLogger(__name__)

EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
FOLDERS_DOC = "folders"     # registry: folder root -> {dataset, doc, files, skipped, synced_at}

# A fingerprint is [size, mtime_ns, sha256 hex or None]. Default mode compares size and mtime;
# --hash compares the content hash (a touched but unchanged file is then not re-indexed).


@dataclass(frozen=True)
class FolderSource:
    root: str                                   # absolute, symlinks resolved
    dataset: str                                # point ids: uuid5(f"{dataset}/{relpath}")
    record: dict                                # relpath -> Fingerprint, as last indexed
    hash: bool = False                          # compare content hashes instead of size+mtime
    only: tuple[str, ...] | None = None         # relpaths (files or subtrees) to sync; None = all

    @property
    def doc(self) -> str:
        return doc_name(self.root)


def resolve_root(entry: str) -> str:
    return str(Path(entry).expanduser().resolve())


def doc_name(root: str) -> str:
    """The store doc holding a folder's record (doc names are restricted; paths are not)."""
    return "folder-" + hashlib.sha256(root.encode()).hexdigest()[:20]


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in EXTS


def hidden(rel: str) -> bool:
    """Hidden files and folders (.thumbnails, .Trash, a store inside the folder) are not indexed."""
    return any(part.startswith(".") for part in rel.split("/") if part)


def owner(key: str, n: int) -> int:
    """Which of n loader workers decodes a file: every worker walks, each decodes its share."""
    return zlib.crc32(key.encode()) % n if n > 1 else 0


def changed(old: Fingerprint | None, new: Fingerprint, by_hash: bool) -> bool:
    if old is None:
        return True
    if by_hash:
        return old[2] is None or old[2] != new[2]
    return old[0] != new[0] or old[1] != new[1]


def walk(root: str, start: str = "") -> Iterator[tuple[str, os.stat_result] | tuple[str, str, str]]:
    """Image files under root/start, depth first in name order, lazily: (relpath, stat), or
    (relpath, reason, detail) for what cannot be walked. Directory symlinks are followed once:
    a directory already walked (a loop, or a second link to it) is a `symlink_loop` skip."""
    top = os.path.join(root, start) if start else root
    visited: set[tuple[int, int]] = set()
    if start:  # the ancestors count as visited, so a loop back to them is still caught
        p = Path(root)
        for part in Path(start).parts[:-1]:
            p = p / part
            try:
                st = os.stat(p)
                visited.add((st.st_dev, st.st_ino))
            except OSError:
                pass
    stack = [(top, start)]
    while stack:
        path, rel = stack.pop()
        try:
            st = os.stat(path)
        except OSError as e:
            yield rel, "unreadable", f"{type(e).__name__}: {e.strerror or e}"
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in visited:
            yield rel, "symlink_loop", f"{path} is a directory already walked"
            continue
        visited.add(ident)
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            yield rel, "unreadable", f"{type(e).__name__}: {e.strerror or e}"
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            erel = f"{rel}/{e.name}" if rel else e.name
            try:
                is_dir = e.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append((e.path, erel))
            elif is_image_name(e.name):
                try:
                    yield erel, os.stat(e.path)
                except OSError as err:  # e.g. a dangling symlink
                    yield erel, "unreadable", f"{type(err).__name__}: {err.strerror or err}"
        stack.extend(reversed(subdirs))


def _file(root: str, rel: str) -> Iterator[tuple[str, os.stat_result] | tuple[str, str, str]]:
    """One changed path (watch mode): a file, a folder to walk, or nothing (gone)."""
    path = os.path.join(root, rel)
    if os.path.isdir(path):
        yield from walk(root, rel)
    elif os.path.lexists(path) and is_image_name(os.path.basename(rel)):
        try:
            yield rel, os.stat(path)
        except OSError as err:
            yield rel, "unreadable", f"{type(err).__name__}: {err.strerror or err}"


def read_file(path: str) -> bytes:
    """A file's bytes (one place, so tests can count what a sync reads)."""
    with open(path, "rb") as f:
        return f.read()


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(not p or key == p or key.startswith(p + "/") for p in prefixes)


def scan(src: FolderSource, worker: int = 0, workers: int = 1, decode: bool = True):
    """Everything one worker reports for a folder: Samples and Skips (new or changed files it
    owns), FileEvents (unchanged, deleted; new/changed when not decoding), walk-level Skips
    (worker 0 only)."""
    seen: set[str] = set()
    only = src.only if src.only is not None else ("",)
    for start in dict.fromkeys(only):
        if hidden(start):
            continue
        found = walk(src.root, start) if not start else _file(src.root, start)
        for item in found:
            rel = item[0]
            if len(item) == 3:
                if worker == 0:
                    yield Skip(src.root, rel or ".", item[1], item[2])
                continue
            if rel in seen:
                continue
            seen.add(rel)
            if owner(rel, workers) != worker:
                continue
            st = item[1]
            old = src.record.get(rel)
            if not stat.S_ISREG(st.st_mode):
                yield Skip(src.root, rel, "not_a_file", "not a regular file")
                continue
            fp: Fingerprint = [st.st_size, st.st_mtime_ns, None]
            if not src.hash and not changed(old, fp, False):
                yield FileEvent(src.root, rel, "unchanged")   # size and mtime: never opened
                continue
            data = None
            if src.hash or decode:
                try:
                    if st.st_size > images.MAX_BYTES:
                        raise images.BadImage("too_large", f"{st.st_size} bytes")
                    data = read_file(os.path.join(src.root, rel))
                except OSError as e:
                    yield Skip(src.root, rel, "unreadable", f"{type(e).__name__}: {e.strerror}")
                    continue
                except images.BadImage as e:
                    # fingerprinted, so a huge file is not re-read on every sync
                    yield Skip(src.root, rel, e.reason, e.detail, fp=fp)
                    continue
                if src.hash:
                    fp[2] = hashlib.sha256(data).hexdigest()
                    if not changed(old, fp, True):
                        yield FileEvent(src.root, rel, "unchanged")
                        continue
            if not decode:
                yield FileEvent(src.root, rel, "changed" if old is not None else "new")
                continue
            try:
                image = images.decode(data)
            except images.BadImage as e:
                yield Skip(src.root, rel, e.reason, e.detail, fp=fp)
                continue
            yield Sample(key=rel, shard=src.root, dataset=src.dataset, image=image,
                         path=os.path.join(src.root, rel), fp=fp)
    for key in src.record:  # gone since the last sync, within what this sync looked at
        if key not in seen and owner(key, workers) == worker and _under(key, only):
            yield FileEvent(src.root, key, "deleted")
