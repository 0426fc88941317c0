"""One writer at a time on a Qdrant server collection: a lease kept in its companion collection.

Why: the Edge backend has its file lock (lock.py), but a Qdrant server is shared by processes on
other hosts (deploy/docker-compose.yml's `indexer` and `indexer-gpu`), where no file lock reaches,
and two builds into one collection overwrite each other's resume records. So a writer takes a
lease before its first write (ServerStore.ensure(), where every build starts; claim_write(),
where `idx cluster` and `idx remove` start, so that a busy collection refuses them before their
work; else the first write), renews it while it runs and gives it back at close().
Readers never look at it, so they are never blocked.

The lease: one point per writer in `<collection>__phisearch_meta` (never a point of the
collection), its id a random token, its payload {name: "__lease__", host, pid, cmd, since,
expires, held}. Qdrant has no compare-and-swap on payloads, so the take is "register, then look":

  1. delete the other lease points whose `expires` has passed (a crashed writer's);
  2. upsert my own point (wait=True, strong ordering: acknowledged means visible to reads);
  3. read every lease point (read consistency `all`): if another unexpired one is there, delete
     mine and back off (retry with jitter until busy_wait runs out), else the lease is mine.

Of two writers whose takes overlap, the one whose step 2 was acknowledged second reads after
both writes, sees the other's point and backs off; so at most one ever holds it (both may back
off: a retry sorts that out, or both are told "busy"). No timing is assumed for that. The other
common recipe, one lease point written with my token and read back after a settle time, needs the
settle to outlast every gap between another writer's read of "free" and its write: a guess.

Heartbeat: a daemon thread renews `expires` every TTL/4 with set_payload on my own point, which
cannot re-create a point another writer deleted; so a writer that crashed frees the collection
at most TTL seconds after its last renewal. A renewal that finds its point gone (taken over), or
cannot renew before `expires` passes, marks the lease lost, and the store's next write raises
instead of writing. A write also renews first when `expires` has passed by our own clock (a
process that was suspended), so it finds out before writing.

Limits: expiry compares the wall clocks of different hosts, which must agree to well within TTL
(NTP): a clock ahead by more than about 3/4 TTL can take a live lease. A writer that is stopped
(SIGSTOP, a paused VM) past TTL and taken over can have one write in flight when it resumes;
Qdrant has no conditional write to fence it. Only phisearch honours the lease. A snapshot restore
takes the lease first (so it waits for a running build), then replaces the companion, and with it
the leases, by the snapshot's (expired ones by then, as a rule). Two phisearch handles in one
process are two writers, as on Edge.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from phisearch.indexer.store.base import StoreError
from qdrant_client import QdrantClient, models

log = logging.getLogger(__name__)
LEASE = "__lease__"      # the `name` payload of a lease point (docs are named otherwise)
TTL = 60.0               # seconds a lease outlives its writer's last renewal
_STRONG = models.WriteOrdering.STRONG
_ALL = models.ReadConsistencyType.ALL
_IS_LEASE = models.Filter(must=[models.FieldCondition(key="name",
                                                      match=models.MatchValue(value=LEASE))])


class LeaseBusy(Exception):
    """Another writer holds the lease (or is taking it); `holder` is its note."""

    def __init__(self, holder: dict) -> None:
        super().__init__("busy")
        self.holder = holder


def describe(note: dict) -> str:
    """'host h, pid 123 (idx build), since 2026-01-02 20:14:03, its lease expires 20:15:03
    unless renewed': who holds a lease, for the busy message."""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(note.get("since", 0)))
    expires = time.strftime("%H:%M:%S", time.localtime(note.get("expires", 0)))
    taking = "" if note.get("held") else "taking it: "
    return (f"{taking}host {note.get('host', '?')}, pid {note.get('pid', '?')} "
            f"({note.get('cmd', '?')}), since {since}, its lease expires {expires} unless renewed")


def _command() -> str:
    argv = [os.path.basename(sys.argv[0] if sys.argv else "python")] + sys.argv[1:2]
    return " ".join(argv)


class WriteLease:
    """This handle's lease on one collection. `run(what, fn)` makes one client call the way the
    store makes its writes: connection errors retried with backoff, the rest one-line
    StoreErrors (a missing companion: the store's Missing). Every call here is idempotent."""

    def __init__(self, client: QdrantClient, companion: str,
                 run: Callable[[str, Callable[[], Any]], Any], ttl: float = TTL) -> None:
        self.client = client
        self.companion = companion
        self.run = run
        self.ttl = ttl
        self.token = str(uuid.uuid4())
        self.held = False
        self.lost: str | None = None    # why the lease was lost, once it was
        self.since = self.expires = 0.0
        self._renewing = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the lease points ---------------------------------------------------------------------
    def notes(self) -> list[dict]:
        """Every lease point of the collection, live or expired: payload plus its token."""
        recs, _ = self.run("read the write lease", lambda: self.client.scroll(
            self.companion, scroll_filter=_IS_LEASE, limit=1000, with_payload=True,
            with_vectors=False, consistency=_ALL))
        return [dict(r.payload or {}, token=str(r.id)) for r in recs]

    def _delete(self, tokens: list[str]) -> None:
        self.run("release the write lease", lambda: self.client.delete(
            self.companion, wait=True, ordering=_STRONG,
            points_selector=models.PointIdsList(points=tokens)))

    def _mine(self) -> dict | None:
        recs = self.run("read the write lease", lambda: self.client.retrieve(
            self.companion, [self.token], with_payload=True, with_vectors=False,
            consistency=_ALL))
        return dict(recs[0].payload or {}) if recs else None

    # -- take, renew, give back ---------------------------------------------------------------
    def acquire(self, timeout: float, poll: float = 0.25) -> None:
        """Take the lease, retrying up to `timeout` seconds; LeaseBusy(holder's note) after."""
        if self.held:
            return
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            others = self._attempt()
            if not others:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                held = [n for n in others if n.get("held")]
                raise LeaseBusy(min(held or others, key=lambda n: n.get("since", 0)))
            time.sleep(min(left, poll * random.uniform(0.5, 1.5)))   # jitter: no lockstep
        self.held, self.lost = True, None
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="phisearch-lease", daemon=True)
        self._thread.start()

    def _attempt(self) -> list[dict]:
        """One take (the module docstring's steps 1-3): [] when the lease is now ours, else the
        other writers' live notes (our own point withdrawn)."""
        now = time.time()
        stale = [n for n in self.notes() if n["token"] != self.token and n.get("expires", 0) < now]
        for n in stale:
            log.warning("taking over the write lease of host %s pid %s: it expired at %s",
                        n.get("host"), n.get("pid"),
                        time.strftime("%H:%M:%S", time.localtime(n.get("expires", 0))))
        if stale:
            self._delete([n["token"] for n in stale])
        self.since, self.expires = now, now + self.ttl
        note = {"name": LEASE, "host": socket.gethostname(), "pid": os.getpid(),
                "cmd": _command(), "since": self.since, "expires": self.expires, "held": False}
        self.run("take the write lease", lambda: self.client.upsert(self.companion, [
            models.PointStruct(id=self.token, vector=[1.0], payload=note)], wait=True,
            ordering=_STRONG))
        try:
            others = [n for n in self.notes()
                      if n["token"] != self.token and n.get("expires", 0) >= time.time()]
            if not others:
                self.run("take the write lease", lambda: self.client.set_payload(
                    self.companion, {"held": True}, points=[self.token], wait=True,
                    ordering=_STRONG))   # for messages only: safety needs no flag
                return []
        except BaseException:
            self._withdraw()
            raise
        self._delete([self.token])
        return others

    def _withdraw(self) -> None:
        """A take that failed half-way: our point must not block others until it expires."""
        try:
            self._delete([self.token])
        except StoreError as e:
            log.warning("could not withdraw a half-taken write lease (%s); it expires at %s", e,
                        time.strftime("%H:%M:%S", time.localtime(self.expires)))

    def renew(self) -> None:
        """Push `expires` on by TTL; mark the lease lost when our point is gone (another writer
        took it over) or could not be renewed before it expired."""
        with self._renewing:
            if not self.held or self.lost:
                return
            now, error = time.time(), None
            try:   # set_payload never creates a point: a deleted lease stays deleted
                self.run("renew the write lease", lambda: self.client.set_payload(
                    self.companion, {"expires": now + self.ttl}, points=[self.token],
                    wait=True, ordering=_STRONG))
            except StoreError as e:
                error = e
            try:
                mine = self._mine()
            except StoreError as e:
                mine, error = {}, error or e     # unknown: as good as not renewed
            if mine is None:
                self.lost = "another writer took over its lease"
            elif error is None:
                self.expires = now + self.ttl
            elif time.time() >= self.expires:
                self.lost = f"its lease expired before it could be renewed ({error})"
            else:
                log.warning("could not renew the write lease (%s); retrying until it expires "
                            "at %s", error, time.strftime("%H:%M:%S",
                                                          time.localtime(self.expires)))
            if self.lost:
                log.error("write lease lost: %s; no more writes from this process", self.lost)

    def check(self) -> str | None:
        """Before a write: why this handle may not write (None: it may). A lease whose expiry
        passed by our own clock (the process was suspended) is renewed first."""
        if self.held and not self.lost and time.time() >= self.expires:
            self.renew()
        return self.lost

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            self.renew()
            if self.lost:
                return

    def _stop_beating(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def release(self) -> None:
        """Give the lease back (a failure only logs: the lease then expires on its own)."""
        if not self.held:
            return
        self._stop_beating()
        self.held = False
        if self.lost:
            return
        try:
            self._delete([self.token])
        except StoreError as e:
            log.warning("could not release the write lease (%s); it expires at %s", e,
                        time.strftime("%H:%M:%S", time.localtime(self.expires)))

    def forget(self) -> None:
        """The companion was deleted or replaced (drop, restore): nothing left to give back."""
        self._stop_beating()
        self.held, self.lost = False, None
