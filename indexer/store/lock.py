"""Our own lock on an Edge collection, taken before `EdgeShard.load` and released after `close`.

Why: in qdrant-edge-py 0.9.0 a `load()` attempted while another process is inside `close()`
leaves the shard with only its last batch (docs/upstream/edge-load-during-close.md). So no
phisearch process ever calls `load()` on a shard another may hold: it waits on this lock instead.

The lock is `fcntl.flock(LOCK_EX)` on `<store>/.locks/<collection>.lock`: outside the collection
folder, so `drop` and a snapshot restore can delete or swap that folder while holding it, and
never deleted itself (a waiter would otherwise lock a file nobody else sees). flock locks belong
to the open file, which a forked child shares through its copy of the descriptor: the descriptor
is close-on-exec, and an at-fork hook closes it in every forked child (closing a copy does not
release the parent's lock). The holder writes its pid and command into the file, so "busy"
can say who holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path

LOCK_DIR = ".locks"
_HELD: set[int] = set()   # descriptors of locks this process holds (closed in forked children)


def _close_in_child() -> None:
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class LockTimeout(Exception):
    """The lock stayed held for the whole wait; `holder` says by whom, when known."""

    def __init__(self, holder: dict | None):
        super().__init__("held")
        self.holder = holder


def lock_path(root: Path, collection: str) -> Path:
    return Path(root) / LOCK_DIR / f"{collection}.lock"


def describe(holder: dict | None) -> str:
    """'pid 123 (idx build), since 20:14:03' for the busy message; '' when unknown."""
    if not holder:
        return ""
    since = time.strftime("%H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} ({holder.get('cmd', '?')}), since {since}"


class CollectionLock:
    """An exclusive, process-wide lock on one collection of an Edge store folder."""

    def __init__(self, root: Path, collection: str) -> None:
        self.path = lock_path(root, collection)
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self, timeout: float, poll: float = 0.05) -> None:
        """Wait up to `timeout` seconds; raise LockTimeout with the holder's note after that."""
        if self.fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + max(0.0, timeout)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockTimeout(self.holder()) from None
                    time.sleep(poll)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        _HELD.add(fd)
        note = json.dumps({"pid": os.getpid(), "cmd": _command(), "since": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, note.encode(), 0)

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        _HELD.discard(fd)
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)   # closing the last descriptor of the open file releases the flock

    def holder(self) -> dict | None:
        """The note of whoever holds the lock now (best effort: it may just have changed)."""
        try:
            text = self.path.read_text()
            return json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return None


def _command() -> str:
    argv = [os.path.basename(sys.argv[0] if sys.argv else "python")] + sys.argv[1:2]
    return " ".join(argv)
