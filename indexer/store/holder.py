"""One store handle for a long-running reader (`idx serve`, the UI), shared by its threads.

An Edge collection allows one open handle, and a build must be able to start at any time. The
holder keeps the collection open between requests (reopening costs ~140 ms at 13k points) and
hands it over on request: whoever waits for the collection's lock leaves a marker (lock.py), and
a watcher thread closes the handle as soon as the holder is idle and a marker from another
process is there (checked every `poll` seconds). While the other process holds the collection,
`use()` waits up to the store config's busy_wait and then raises StoreBusy (serve: 503 with
Retry-After); after it is done, the next use opens the collection again. `hold_s` bounds how
long an idle handle is kept at all (inf: until someone asks; 0: closed after every use). A
server allows any number of clients, so its handle is kept. A collection that did not exist
when opened is looked for again at the next use.

Aliases: cfg.collection may be an alias (`idx alias set live b`). Every use looks up what it
names now (Edge: the folder's aliases.json; a server: one get_aliases call) and, when the alias
has moved, closes the old target's handle and opens the new one, so a running serve or UI
answers from the new target at its next request: model upgrades without downtime.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from phisearch.indexer.store import Backend, Store, StoreConfig, backend, backend_class
from phisearch.indexer.store import edge_files as files

log = logging.getLogger(__name__)
T = TypeVar("T")


class StoreHolder:
    """The process's one handle on cfg's collection, under a lock, handed over when asked."""

    def __init__(self, cfg: StoreConfig, hold_s: float = math.inf, poll: float = 0.1) -> None:
        self.cfg = cfg
        self.hold_s = hold_s
        self.poll = poll
        self._lock = threading.RLock()
        self._store: Store | None = None
        self._keep = backend_class(cfg).shares_handles   # a server's: kept for good
        self._edge = backend_class(cfg).kind == "edge"
        self._place: Backend | None = None   # a server: its one client, with the handle
        self._last_used = 0.0
        self._watcher: threading.Thread | None = None
        self.handovers = 0            # times the handle was given up because someone asked

    @property
    def is_open(self) -> bool:
        return self._store is not None

    @property
    def releases_when_idle(self) -> bool:
        """False for a server's handle, which is kept (any number of clients may hold one)."""
        return not self._keep

    @contextmanager
    def use(self) -> Iterator[Store]:
        """The open store for the length of the with-block (consume scrolls inside it).
        Raises StoreBusy while another process holds an Edge collection."""
        with self._lock:
            if self._store is not None and not self._store.is_built:
                self._close()   # opened before `idx build` made it: look again
            if self._store is not None and (now := self.target()) != self._store.name:
                log.info("%s now names %s (was %s): switching", self.cfg.collection, now,
                         self._store.name)
                self._close()   # `idx alias set` moved it: open the new target
            if self._store is None:
                self._store = self._open()
            try:
                yield self._store
            finally:
                self._last_used = time.monotonic()
                self._after_use()

    def target(self) -> str:
        """The collection cfg.collection names now: itself, or an alias's current target."""
        name = self.cfg.collection
        if self._edge:
            return files.resolve(Path(self.cfg.path or ""), name)
        return self._server().aliases().get(name, name)

    def _server(self) -> Backend:
        if self._place is None:
            self._place = backend(replace(self.cfg, yields=True))
        return self._place

    def _open(self) -> Store:
        if self._edge:
            return backend(replace(self.cfg, yields=True)).open()
        return self._server().open()   # shares the place's client (closed with the handle)

    def unheld(self, fn: Callable[[StoreConfig], T]) -> T:
        """Call fn(cfg), a library function that opens the store itself (pipeline.status),
        with this process's handle closed meanwhile."""
        with self._lock:
            self._close()
            return fn(self.cfg)

    def release(self) -> None:
        """Close the handle now (the next use reopens it)."""
        with self._lock:
            self._close()

    def _after_use(self) -> None:
        if self._keep or self._store is None:
            return
        if self.hold_s <= 0 or self._store.others_waiting():
            self._close(asked=self.hold_s > 0)
            return
        if self._watcher is None or not self._watcher.is_alive():
            self._watcher = threading.Thread(target=self._watch, daemon=True,
                                             name="phisearch-store-holder")
            self._watcher.start()

    def _watch(self) -> None:
        """While the handle is open: close it when idle and asked for, or idle past hold_s."""
        while True:
            time.sleep(self.poll)
            if not self._lock.acquire(blocking=False):
                continue            # a request is using it: look again after it
            try:
                if self._store is None:
                    return
                asked = self._store.others_waiting()
                if asked or time.monotonic() - self._last_used >= self.hold_s:
                    self._close(asked=asked)
                    return
            finally:
                self._lock.release()

    def _close(self, asked: bool = False) -> None:
        place, self._place = self._place, None
        if self._store is not None:
            try:
                self._store.close()   # a server's store closes the client it shares with place
            finally:
                self._store = None
                self.handovers += asked
                log.info("store handle released%s", " (another process asked)" if asked else "")
        elif place is not None:
            place.close()
