"""WebDataset shards -> batches of decoded 64x64 samples, with every bad sample counted.

Reading and decoding run in DataLoader workers (one shard at a time per worker). A batch carries
its samples, the samples skipped since the last batch (with reasons) and the shards whose last
sample it holds, so the writer can mark a shard complete exactly when its last point is stored.
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import os
import random
import signal
import tarfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset
from webdataset import filters
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from . import images
from .folders import FileEvent, FolderSource, scan

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")


@dataclass
class Sample:
    key: str
    shard: str               # the shard's url or path, as given (after brace expansion)
    dataset: str
    image: np.ndarray        # (64, 64, 3) uint8
    label: int | None = None
    label_name: str | None = None
    split: str | None = None
    path: str | None = None  # folder sources: the file, so a hit can be opened
    fp: list | None = None   # folder sources: the file's fingerprint (folders.Fingerprint)


@dataclass
class Skip:
    shard: str
    key: str | None
    reason: str              # short counter key: corrupt_image, truncated_tar, no_image, ...
    detail: str = ""
    fp: list | None = None   # folder files: recorded, so an unchanged bad file is not retried


@dataclass
class ShardFailed:
    """A shard that could not be read as a whole (not a tar, empty, a failed pipe command): an
    error for that shard, never recorded as done, so the next run tries it again."""
    shard: str
    reason: str              # not_a_tar | empty_shard | pipe_failed | unreadable_shard
    detail: str = ""


@dataclass
class Batch:
    samples: list[Sample] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    shards_done: list[str] = field(default_factory=list)
    shards_failed: list[ShardFailed] = field(default_factory=list)
    events: list[FileEvent] = field(default_factory=list)   # folder files: unchanged, deleted
    folders_done: list[str] = field(default_factory=list)   # folder roots this worker walked

    def images(self) -> np.ndarray:
        """(N, 64, 64, 3) uint8."""
        if not self.samples:
            return np.zeros((0, images.SIZE, images.SIZE, 3), np.uint8)
        return np.stack([s.image for s in self.samples])

    def __len__(self) -> int:
        return len(self.samples)


def shard_key(url: str) -> str:
    """A shard's identity for resume records: its resolved absolute path (so `../x.tar`,
    `/abs/x.tar` and `x.tar` from its folder are one shard); `pipe:` commands as given."""
    return url if url.startswith("pipe:") else os.path.realpath(os.path.expanduser(url))


def expand(patterns: Iterable[str]) -> list[str]:
    """Paths, brace patterns and `pipe:` commands -> a list of shard urls (local paths resolved,
    see shard_key). Missing local files are an error up front, not a skip in the middle of a
    run."""
    urls: list[str] = []
    for pattern in patterns:
        for url in braceexpand(str(pattern)):
            if not url.startswith("pipe:") and not Path(url).expanduser().is_file():
                raise FileNotFoundError(f"shard not found: {url}")
            url = shard_key(url)
            if url not in urls:
                urls.append(url)
    if not urls:
        raise ValueError("no shards given")
    return urls


def fingerprint(url: str) -> str:
    """Identity of a shard's content for resume: size and mtime for files; the command for pipes."""
    if url.startswith("pipe:"):
        return "pipe"
    st = os.stat(url)
    return f"{st.st_size}:{st.st_mtime_ns}"


@dataclass(frozen=True)
class FolderInfo:
    dataset: str
    label_names: dict[int, str]


@lru_cache(maxsize=256)
def folder_info(url: str, dataset: str | None = None) -> FolderInfo:
    """Dataset name (manifest.json `name`, else `dataset`, else the folder's name) and label
    names (labels.tsv: id, wnid, label) of the folder a shard lives in."""
    folder = Path(url.removeprefix("pipe:").split()[-1] if url.startswith("pipe:") else url).parent
    name = dataset
    manifest = folder / "manifest.json"
    if name is None and manifest.is_file():
        try:
            name = json.loads(manifest.read_text()).get("name")
        except (OSError, ValueError):
            log.warning("unreadable manifest %s", manifest)
    labels: dict[int, str] = {}
    tsv = folder / "labels.tsv"
    if tsv.is_file():
        for line in tsv.read_text().splitlines()[1:]:
            parts = line.split("\t")
            if len(parts) >= 3 and parts[0].isdigit():
                labels[int(parts[0])] = parts[2]
    return FolderInfo(dataset=name or folder.name or "default", label_names=labels)


def _reason(exn: Exception) -> str:
    if isinstance(exn, tarfile.ReadError) or "unexpected end" in str(exn).lower():
        return "truncated_tar"
    if isinstance(exn, (FileNotFoundError, PermissionError)):
        return "unreadable_shard"
    if isinstance(exn, tarfile.TarError):
        return "corrupt_tar"
    return "read_error"


def read_shard(url: str) -> Iterator[dict | Skip | ShardFailed]:
    """Raw webdataset samples of one shard (dicts of bytes) and Skips for what failed to read.
    A shard with no readable sample at all ends with ShardFailed instead (not a tar, an empty
    file, a pipe command that failed), as does a pipe command that exits with an error."""
    errors: list[Exception] = []

    def handler(exn: Exception) -> bool:
        errors.append(exn)
        return True

    truncated = {"seen": False}
    first_error: list[Skip] = []

    def drain() -> Iterator[Skip]:
        while errors:
            exn = errors.pop(0)
            reason = _reason(exn)
            if reason == "truncated_tar":  # webdataset reports one cut twice (member, then tar)
                if truncated["seen"]:
                    continue
                truncated["seen"] = True
            skip = Skip(url, None, reason, str(exn.args[0] if exn.args else exn)[:200])
            if n_raw:
                yield skip
            elif not first_error:  # nothing read yet: judged at the end (a shard failure?)
                first_error.append(skip)

    try:
        stream = gopen(url)
    except Exception as exn:  # noqa: BLE001 - a failure of this shard; the run goes on
        yield ShardFailed(url, _reason(exn), one_line(exn))
        return
    n_raw = 0
    try:
        files = tar_file_expander([dict(url=url, stream=stream)], handler=handler)
        for raw in group_by_keys(files, handler=handler):
            yield from drain()
            n_raw += 1
            yield raw
        yield from drain()
    finally:
        try:
            stream.close()
            closed = None
        except OSError as exn:      # gopen's pipe: the command exited with an error
            closed = exn
    if closed is not None:
        yield ShardFailed(url, "pipe_failed", one_line(closed))
    elif not n_raw and first_error:
        detail = first_error[0].detail
        yield ShardFailed(url, "empty_shard" if "empty file" in detail else "not_a_tar", detail)


def one_line(exn: BaseException) -> str:
    """An exception as one short line (gopen's pipe errors carry a tuple of arguments)."""
    text = str(exn.args[0] if len(exn.args) == 1 else exn)
    if "exit " in text and "(read)" in text:   # gopen: "(('cmd',), {...}): exit 1 (read) {}"
        text = "exit " + text.split("exit ", 1)[1].split(" (read)")[0]
    return " ".join(text.split())[:200]


def decode_sample(raw: dict, url: str, info: FolderInfo) -> Sample | Skip:
    key = raw.get("__key__", "?")
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        return Skip(url, key, "no_image", f"members: {sorted(k for k in raw if not k.startswith('__'))}")
    try:
        image = images.decode(raw[ext])
    except images.BadImage as e:
        return Skip(url, key, e.reason, e.detail)
    meta: dict = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except ValueError:
            meta = {}
    label = None
    if "cls" in raw:
        try:
            label = int(raw["cls"].decode().strip())
        except (ValueError, UnicodeDecodeError):
            label = None
    label_name = meta.get("label") or (info.label_names.get(label) if label is not None else None)
    return Sample(key=key, shard=url, dataset=info.dataset, image=image, label=label,
                  label_name=label_name, split=meta.get("split"))


class ShardStream(IterableDataset):
    """Batches from shards and folders. Each worker takes every k-th shard; with `repeat`, shards
    are reshuffled and read again forever (training). Every worker walks every folder and
    decodes its share of the files (folders.owner), then reports the folder in folders_done."""

    def __init__(self, urls: list[str], batch_size: int, *, dataset: str | None = None,
                 shuffle_buffer: int = 0, repeat: bool = False, seed: int = 0,
                 folders: list[FolderSource] = ()):
        self.urls = list(urls)
        self.folders = list(folders)
        self.batch_size = batch_size
        self.dataset = dataset
        self.shuffle_buffer = shuffle_buffer
        self.repeat = repeat
        self.seed = seed

    def _my_shards(self, epoch: int) -> list[str]:
        wi = torch.utils.data.get_worker_info()
        wid, n = (wi.id, wi.num_workers) if wi else (0, 1)
        urls = list(self.urls)
        if self.repeat:
            random.Random(self.seed + epoch).shuffle(urls)
        if n > 1 and len(urls) < n and self.repeat:
            urls = urls * n  # few shards, many workers: everyone reads all, in its own order
            random.Random(self.seed + 1000 * wid + epoch).shuffle(urls)
            return urls[wid::n]
        return urls[wid::n]

    def _items(self) -> Iterator[Sample | Skip | ShardFailed | str]:
        """Samples, skips and file events; a bare string is the url of a shard that just ended
        (a failed shard ends with its ShardFailed instead), a ("folder_done", root) tuple a
        folder this worker finished."""
        epoch = 0
        while True:
            good = 0
            for url in self._my_shards(epoch):
                info = folder_info(url, self.dataset)
                failed = False
                for raw in read_shard(url):
                    if isinstance(raw, (Skip, ShardFailed)):
                        failed = failed or isinstance(raw, ShardFailed)
                        item = raw
                    else:
                        item = decode_sample(raw, url, info)
                    good += isinstance(item, Sample)
                    yield item
                if not failed:
                    yield url
            wi = torch.utils.data.get_worker_info()
            wid, n = (wi.id, wi.num_workers) if wi else (0, 1)
            for src in self.folders:
                yield from scan(src, wid, n)
                yield ("folder_done", src.root)
            epoch += 1
            if not self.repeat:
                return
            if not good:  # repeating a stream with nothing readable would spin forever
                raise RuntimeError(f"no readable samples in {self._my_shards(epoch)}")

    def __iter__(self) -> Iterator[Batch]:
        items: Iterable = self._items()
        if self.shuffle_buffer:
            wi = torch.utils.data.get_worker_info()
            rng = random.Random(self.seed + (wi.id if wi else 0))
            items = filters.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer // 2,
                                    rng=rng)(items)
        batch = Batch()
        for item in items:
            if isinstance(item, Sample):
                batch.samples.append(item)
            elif isinstance(item, Skip):
                batch.skips.append(item)
            elif isinstance(item, ShardFailed):
                batch.shards_failed.append(item)
            elif isinstance(item, FileEvent):
                batch.events.append(item)
            elif isinstance(item, tuple):
                batch.folders_done.append(item[1])
            else:
                batch.shards_done.append(item)
            if len(batch.samples) >= self.batch_size:
                yield batch
                batch = Batch()
        if batch.samples or batch.skips or batch.shards_done or batch.shards_failed \
                or batch.events or batch.folders_done:
            yield batch


WORKER_START = "forkserver"   # see loader(): workers never inherit the store's descriptors


def _process_key(pid: int) -> str | None:
    """The pid's start time from /proc (None when it is gone or a zombie): a pid can be
    reused, and a killed parent stays a zombie until its own parent reaps it."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else fields[19]


def _parent_watch(main_pid: int, key: str | None) -> None:
    """A worker's watchdog thread: exit the moment the main process is gone. A worker blocked
    writing a batch into a full pipe would otherwise outlive a killed build for minutes, and
    its copies of the forkserver's descriptors keep that server (and its tracker) alive."""
    while True:
        time.sleep(0.25)
        if key is not None:
            if _process_key(main_pid) != key:
                os._exit(1)
            continue
        try:                      # no /proc: a plain existence check
            os.kill(main_pid, 0)
        except OSError:
            os._exit(1)


def _worker_init(main_pid: int, _: int) -> None:
    # Ctrl-C reaches the whole process group: the main process decides how to stop (finish the
    # current batch), so a worker killed by SIGINT mid-batch must not make that batch fail.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM keeps its default: multiprocessing ends workers with it at exit.
    _die_with_parent()
    key = _process_key(main_pid) if Path("/proc/self/stat").exists() else None
    if key is None and Path("/proc/self/stat").exists():
        os._exit(1)               # the main process died before this worker started
    threading.Thread(target=_parent_watch, args=(main_pid, key), daemon=True,
                     name="phisearch-parent-watch").start()


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent (the forkserver, which exits when the main
    process does) dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _context() -> multiprocessing.context.BaseContext:
    """Workers start from a forkserver (itself started by exec, so it holds no descriptor of
    ours): a forked worker would inherit the Edge shard's WAL lock and our collection lock and
    keep the store locked after the build is killed. The server preloads this module, so a
    worker starts in about 0.2 s (a spawned one takes 2-3 s to import torch)."""
    ctx = multiprocessing.get_context(WORKER_START)
    ctx.set_forkserver_preload([__name__])
    return ctx


def loader(urls: list[str], batch_size: int, workers: int = 1, **kw) -> DataLoader:
    """A DataLoader over ShardStream (batches are formed in the workers). A folder is split
    between all workers, so only shards cap the worker count."""
    if not kw.get("repeat") and not kw.get("folders"):
        workers = min(workers, len(urls))
    workers = max(0, workers)
    return DataLoader(ShardStream(urls, batch_size, **kw), batch_size=None, num_workers=workers,
                      persistent_workers=False, prefetch_factor=4 if workers else None,
                      worker_init_fn=partial(_worker_init, os.getpid()) if workers else None,
                      multiprocessing_context=_context() if workers else None)
