"""The loader: shards and folders -> Batches, decoded in DataLoader workers.

Workers start from a forkserver and die with the process that started them, so a killed build
leaves no worker holding the store (its lock and the shard's WAL lock are never inherited).
Each worker takes every k-th shard; every worker walks every folder and decodes its share.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import random
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path

import torch
from phisearch.indexer.sources.folders import FolderSource, scan
from phisearch.indexer.sources.records import (
    Batch,
    FileEvent,
    FolderDone,
    Sample,
    ShardDone,
    ShardFailed,
    Skip,
)
from phisearch.indexer.sources.shards import decode_sample, folder_info, read_shard
from torch.utils.data import DataLoader, IterableDataset
from webdataset import filters


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

    def _items(self) -> Iterator[Sample | Skip | ShardFailed | ShardDone | FileEvent | FolderDone]:
        """Every record in stream order: a shard's samples and skips, then its ShardDone (a
        failed shard ends with its ShardFailed instead); a folder's, then its FolderDone."""
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
                    yield ShardDone(url)
            wi = torch.utils.data.get_worker_info()
            wid, n = (wi.id, wi.num_workers) if wi else (0, 1)
            for src in self.folders:
                yield from scan(src, wid, n)
                yield FolderDone(src.root)
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
            elif isinstance(item, FolderDone):
                batch.folders_done.append(item.root)
            elif isinstance(item, ShardDone):
                batch.shards_done.append(item.shard)
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


def first_samples(urls: list[str], limit: int | None, labelled: bool = False) -> list[Sample]:
    """The first `limit` decodable samples of the shards, in order (the one helper for "N test
    images"; `labelled`: skip samples without a label). No workers: order is the shards'."""
    out: list[Sample] = []
    for batch in loader(urls, batch_size=256, workers=0):
        out.extend(s for s in batch.samples if s.label is not None or not labelled)
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ValueError(f"no {'labelled ' if labelled else ''}samples in {list(urls)}")
    return out[:limit]
