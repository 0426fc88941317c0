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

Handing over: whoever waits for a held lock leaves a marker `<collection>.wanted.<pid>` beside
it for as long as it waits. Long-lived readers (`idx serve`, the UI: holder.py) look for other
processes' markers between requests and let go when one is there, so a build, a `remove` or
another reader gets the collection within a fraction of a second; a build or any other
short-lived user never looks, and keeps the lock until it is done.
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
        self._marker: Path | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self, timeout: float, poll: float = 0.05, polite: bool = False) -> None:
        """Wait up to `timeout` seconds; raise LockTimeout with the holder's note after that.
        polite (long-lived readers): never take the lock while a writer waits for it, so a
        reader that just let go does not win it straight back."""
        if self.fd is not None:
            return
        # one marker per waiting lock object (a process may hold in one thread and wait in
        # another: the UI's holder and a page that opens the store itself)
        self._marker = self.path.with_name(
            f"{self.path.stem}.wanted.{os.getpid()}.{id(self)}.{'r' if polite else 'w'}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + max(0.0, timeout)
        try:
            while True:
                try:
                    if polite and self._waiting(kinds="w"):
                        raise BlockingIOError   # a writer is next
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockTimeout(self.holder()) from None
                    self._marker.touch()   # ask a long-lived reader to let go
                    time.sleep(poll)
        except BaseException:
            os.close(fd)
            raise
        finally:
            self._marker.unlink(missing_ok=True)
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

    def others_waiting(self) -> bool:
        """Whether anyone else (another process, or another handle in this one) waits for
        this lock: a marker other than our own, left by a live process."""
        return self._waiting(kinds="rw")

    def _waiting(self, kinds: str) -> bool:
        for m in self.path.parent.glob(f"{self.path.stem}.wanted.*"):
            if m == self._marker:
                continue
            parts = m.name.split(".wanted.", 1)[1].split(".")   # pid, object id, r|w
            if len(parts) != 3 or not parts[0].isdigit() or parts[2] not in kinds:
                continue
            if _alive(int(parts[0])):
                return True
            m.unlink(missing_ok=True)      # left by a process that died waiting
        return False

    def holder(self) -> dict | None:
        """The note of whoever holds the lock now (best effort: it may just have changed)."""
        try:
            text = self.path.read_text()
            return json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _command() -> str:
    argv = [os.path.basename(sys.argv[0] if sys.argv else "python")] + sys.argv[1:2]
    return " ".join(argv)
