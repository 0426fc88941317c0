"""A folder of your own images as a source for `idx build`: walked lazily, kept in sync.

The walk runs inside the DataLoader workers (no pre-scan: the first batch starts after
`batch_size` decodes, however many files the folder holds). Each file is compared with the
folder's record (relpath -> fingerprint, kept in a store doc): unchanged files are counted and
passed over, new and changed ones decoded by `images.decode` (the same function as shards and
uploads), and recorded files that are gone are reported as deleted at the end of the walk.

Only a file verifiably gone from a directory that could be listed is deleted. A path that cannot
be read (a link to a drive that is away, a mount point left empty, a directory that cannot be
listed, the folder itself missing) is reported as `offline` or `unreadable`, and the points of
the files recorded under it are kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import zlib
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from phisearch.indexer.sources import images
from phisearch.indexer.sources.records import FileEvent, Fingerprint, Sample, Skip

log = logging.getLogger(__name__)

EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
FOLDERS_DOC = "folders"     # registry: folder root -> {dataset, doc, files, skipped, synced_at,
                            # mounts, unavailable}
OFFLINE = "offline"         # a dangling directory link, a missing folder, a mount that is away
UNREADABLE = "unreadable"   # a directory that cannot be listed, a file that cannot be read
AWAY = (OFFLINE, UNREADABLE)  # walk problems whose recorded files keep their points

# A fingerprint is [size, mtime_ns, sha256 hex or None]. Default mode compares size and mtime;
# --hash compares the content hash (a touched but unchanged file is then not re-indexed).


@dataclass(frozen=True)
class FolderSource:
    root: str                                   # absolute, symlinks resolved
    dataset: str                                # point ids: uuid5(f"{dataset}/{relpath}")
    record: dict                                # relpath -> Fingerprint, as last indexed
    hash: bool = False                          # compare content hashes instead of size+mtime
    only: tuple[str, ...] | None = None         # relpaths (files or subtrees) to sync; None = all
    mounts: dict | None = None                  # relpath ("" = root) -> the mount point it was on

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


Problem = tuple[str, str, str]   # (relpath, reason, detail): what the walk could not read


def _oserror(e: OSError) -> str:
    return f"{type(e).__name__}: {e.strerror or e}"


def mount_point(path: str) -> str:
    """The mount point `path` lies on (its resolved form, or the nearest ancestor mounted)."""
    p = os.path.realpath(path)
    while not os.path.ismount(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return p


def away_mounts(root: str, mounts: dict | None) -> dict[str, str]:
    """Recorded mount points that are not mounted now, under a directory still there (the empty
    mount point of a drive that is away): relpath -> detail. Its files are offline, not gone."""
    out = {}
    for rel, mp in (mounts or {}).items():
        if os.path.isdir(os.path.join(root, rel) if rel else root) and not os.path.ismount(mp):
            out[rel] = f"{mp} is not mounted (a drive that is away?)"
    return out


def _dangling(path: str, rel: str) -> Problem:
    """A link whose target is missing: a file link is `unreadable`, anything else may be a
    directory on a drive that is away (`offline`). Either way its recorded files are kept."""
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    reason = UNREADABLE if is_image_name(os.path.basename(rel)) else OFFLINE
    return rel, reason, f"link to {target}, which is missing"


def _missing_root(root: str) -> Problem:
    return "", OFFLINE, f"folder {root} not found (a drive that is away?)"


def walk(root: str, start: str = "", away: dict[str, str] | None = None
         ) -> Iterator[tuple[str, os.stat_result] | Problem]:
    """Image files under root/start, depth first in name order, lazily: (relpath, stat), or
    (relpath, reason, detail) for what cannot be walked (reason offline, unreadable or
    symlink_loop), or (relpath, "mount", "") for a directory on another device than its parent
    (recorded, so an empty mount point is later told from a folder emptied). Directory symlinks
    are followed once: a directory already walked (a loop, or a second link to it) is a
    `symlink_loop` skip. `away`: relpaths not to enter (away_mounts)."""
    away = away or {}
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
    try:
        top_dev = os.stat(os.path.dirname(top)).st_dev if start else None
    except OSError:
        top_dev = None
    stack: list[tuple[str, str, int | None]] = [(top, start, top_dev)]
    while stack:
        path, rel, parent_dev = stack.pop()
        if rel in away:
            yield rel, OFFLINE, away[rel]
            continue
        try:
            st = os.stat(path)
        except FileNotFoundError:
            yield _missing_root(root) if not rel else _dangling(path, rel)
            continue
        except OSError as e:
            yield rel, UNREADABLE, _oserror(e)
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in visited:
            yield rel, "symlink_loop", f"{path} is a directory already walked"
            continue
        visited.add(ident)
        if parent_dev is not None and st.st_dev != parent_dev:
            yield rel, "mount", ""
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            yield rel, UNREADABLE, _oserror(e)
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            erel = f"{rel}/{e.name}" if rel else e.name
            try:
                is_dir = e.is_dir()  # follows symlinks
                dangling = not is_dir and e.is_symlink() and not os.path.exists(e.path)
            except OSError:
                is_dir, dangling = False, False
            if is_dir:
                subdirs.append((e.path, erel, st.st_dev))
            elif dangling:  # a link to a drive that is away, or to a file that is gone
                yield _dangling(e.path, erel)
            elif is_image_name(e.name):
                try:
                    yield erel, os.stat(e.path)
                except OSError as err:
                    yield erel, UNREADABLE, _oserror(err)
        stack.extend(reversed(subdirs))


def _blocked(root: str, rel: str, away: dict[str, str]) -> Problem | None:
    """The first ancestor of `rel` (the root included) that cannot be read, so whether rel's
    files are still there cannot be told; None when each exists and lists, or when one is
    verifiably gone from a parent that lists (then so is everything under it)."""
    parts = rel.split("/")
    for i in range(len(parts)):
        pre = "/".join(parts[:i])
        path = os.path.join(root, pre) if pre else root
        if pre in away:
            return pre, OFFLINE, away[pre]
        if os.path.islink(path) and not os.path.exists(path):
            return _dangling(path, pre)
        if not os.path.exists(path):
            return _missing_root(root) if not pre else None
        try:
            with os.scandir(path) as it:
                next(it, None)
        except OSError as e:
            return pre, UNREADABLE, _oserror(e)
    return None


def _file(root: str, rel: str, away: dict[str, str] | None = None
          ) -> Iterator[tuple[str, os.stat_result] | Problem]:
    """One changed path (watch mode): a file, a folder to walk, what cannot be read (the path,
    or an ancestor), or nothing (gone)."""
    away = away or {}
    problem = _blocked(root, rel, away)
    if problem is not None:
        yield problem
        return
    path = os.path.join(root, rel)
    if os.path.isdir(path):
        yield from walk(root, rel, away)
    elif os.path.islink(path) and not os.path.exists(path):
        yield _dangling(path, rel)
    elif os.path.lexists(path) and is_image_name(os.path.basename(rel)):
        try:
            yield rel, os.stat(path)
        except OSError as err:
            yield rel, UNREADABLE, _oserror(err)


def read_file(path: str) -> bytes:
    """A file's bytes (one place, so tests can count what a sync reads)."""
    with open(path, "rb") as f:
        return f.read()


def under(key: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    """key is one of prefixes or inside one ("" holds everything)."""
    return any(not p or key == p or key.startswith(p + "/") for p in prefixes)


def _within(key: str, paths: set[str]) -> bool:
    """under(key, paths) for many paths: key or one of its ancestors is in the set."""
    if not paths:
        return False
    if "" in paths or key in paths:
        return True
    return any(key[:i] in paths for i, c in enumerate(key) if c == "/")


class _Kept:
    """How many recorded files lie under a path (sorted once, on the first problem)."""

    def __init__(self, record: dict) -> None:
        self.record = record
        self.keys: list[str] | None = None

    def __call__(self, rel: str) -> int:
        if not rel:
            return len(self.record)
        if self.keys is None:
            self.keys = sorted(self.record)
        # rel itself, then rel/...: "/" sorts just before "0", so rel/ .. rel0 is the subtree
        inside = bisect_left(self.keys, rel + "0") - bisect_left(self.keys, rel + "/")
        return inside + (rel in self.record)


def scan(src: FolderSource, worker: int = 0, workers: int = 1, decode: bool = True):
    """Everything one worker reports for a folder: Samples and Skips (new or changed files it
    owns), FileEvents (unchanged, deleted; new/changed when not decoding), walk-level Skips and
    `mount` FileEvents (worker 0 only). A recorded file is deleted only when the directory that
    held it was listed without it: under a path that could not be read it is kept, and that
    path is a Skip (offline or unreadable) whose `kept` counts the recorded files under it."""
    seen: set[str] = set()
    protected: set[str] = set()
    kept = _Kept(src.record)
    away = away_mounts(src.root, src.mounts)
    only = src.only if src.only is not None else ("",)
    for start in dict.fromkeys(only):
        if hidden(start):
            continue
        found = walk(src.root, start, away) if not start else _file(src.root, start, away)
        for item in found:
            rel = item[0]
            if len(item) == 3:
                if item[1] in AWAY:
                    protected.add(rel)
                if worker != 0:
                    continue
                if item[1] == "mount":
                    yield FileEvent(src.root, rel, "mount")
                else:
                    yield Skip(src.root, rel or ".", item[1], item[2],
                               kept=kept(rel) if item[1] in AWAY else None)
                continue
            if rel in seen:
                continue
            seen.add(rel)
            if owner(rel, workers) != worker:
                continue
            yield from _one(src, rel, item[1], decode)
    for key in src.record:  # gone since the last sync, within what this sync could read
        if key not in seen and owner(key, workers) == worker and under(key, only) \
                and not _within(key, protected):
            yield FileEvent(src.root, key, "deleted")


def _one(src: FolderSource, rel: str, st: os.stat_result, decode: bool):
    """A file this worker owns: unchanged, new or changed (decoded), or skipped."""
    old = src.record.get(rel)
    if not stat.S_ISREG(st.st_mode):
        yield Skip(src.root, rel, "not_a_file", "not a regular file")
        return
    fp: Fingerprint = [st.st_size, st.st_mtime_ns, None]
    if not src.hash and not changed(old, fp, False):
        yield FileEvent(src.root, rel, "unchanged")   # size and mtime: never opened
        return
    data = None
    if src.hash or decode:
        try:
            if st.st_size > images.MAX_BYTES:
                raise images.BadImage("too_large", f"{st.st_size} bytes")
            data = read_file(os.path.join(src.root, rel))
        except OSError as e:   # kept (seen), retried next time
            yield Skip(src.root, rel, UNREADABLE, _oserror(e), kept=int(old is not None))
            return
        except images.BadImage as e:
            # fingerprinted, so a huge file is not re-read on every sync
            yield Skip(src.root, rel, e.reason, e.detail, fp=fp)
            return
        if src.hash:
            fp[2] = hashlib.sha256(data).hexdigest()
            if not changed(old, fp, True):
                yield FileEvent(src.root, rel, "unchanged")
                return
    if not decode:
        yield FileEvent(src.root, rel, "changed" if old is not None else "new")
        return
    try:
        image = images.decode(data)
    except images.BadImage as e:
        yield Skip(src.root, rel, e.reason, e.detail, fp=fp)
        return
    yield Sample(key=rel, shard=src.root, dataset=src.dataset, image=image,
                 path=os.path.join(src.root, rel), fp=fp)
