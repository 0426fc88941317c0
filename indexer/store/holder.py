"""One store handle for a long-running reader (`idx serve`, the UI), shared by its threads.

An Edge collection allows one open handle, and a build must be able to start at any time, so
the holder opens it on first use and closes it after `hold_s` idle seconds (0: after every use);
a server allows any number of clients, so its handle is kept. A collection that did not exist
when opened is looked for again at the next use.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from phisearch.indexer.store import Store, StoreConfig, backend_class, open_store

log = logging.getLogger(__name__)
T = TypeVar("T")


class StoreHolder:
    """The process's one handle on cfg's collection, under a lock, released when idle."""

    def __init__(self, cfg: StoreConfig, hold_s: float) -> None:
        self.cfg = cfg
        self.hold_s = hold_s
        self._lock = threading.RLock()
        self._store: Store | None = None
        self._keep = backend_class(cfg).shares_handles   # a server's: kept for good
        self._timer: threading.Timer | None = None
        self._last_used = 0.0

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
            if self._store is None:
                self._store = open_store(self.cfg)
            try:
                yield self._store
            finally:
                self._last_used = time.monotonic()
                self._arm()

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

    def _arm(self) -> None:
        if self._keep:
            return
        if self._timer is not None:
            self._timer.cancel()
        if self.hold_s <= 0:
            self._close()
            return
        self._timer = threading.Timer(self.hold_s, self._close_if_idle)
        self._timer.daemon = True
        self._timer.start()

    def _close_if_idle(self) -> None:
        with self._lock:
            if time.monotonic() - self._last_used >= self.hold_s - 1e-3:
                self._close()

    def _close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._store is not None:
            try:
                self._store.close()
            finally:
                self._store = None
                log.info("store handle released")
