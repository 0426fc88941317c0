"""One writer at a time on the server backend (indexer/store/lease.py), as Edge's lock gives on a
folder: a second writer is refused with one line naming the holder (host, pid, since, until),
proceeds once the first closes, takes over a lease that expired (a writer that crashed), and a
reader is never blocked. A build holds the lease from its first write to its end; `idx cluster`
and `idx remove` are refused before their work (claim_write). Run on
qdrant-client's local mode (conftest's "server-local") and on a real server when QDRANT_URL is
set ("server-url"). Expiry is simulated by writing a lease whose expiry is past: no sleeping."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from conftest import SERVER_KINDS, drop, store_place
from phisearch.indexer.store import StoreBusy, StoreConfig, StoreError, backend, open_store
from phisearch.indexer.store import server as store_server
from phisearch.indexer.store.lease import LEASE, TTL
from qdrant_client import models
from test_store import META, make_points


class Serialized:
    """The injected local-mode client, one call at a time: local mode (Qdrant's API in-process,
    standing in for a server) is not thread-safe, and a writer's heartbeat thread (or a build's
    writer thread) calls it beside the test's own calls. A real server takes concurrent calls."""

    def __init__(self, client: Any) -> None:
        self._client, self._lock = client, threading.RLock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kw: Any) -> Any:
            with self._lock:
                return attr(*args, **kw)
        return call


@pytest.fixture(params=SERVER_KINDS)
def cfg(request, tmp_path) -> Iterator[StoreConfig]:
    """A fresh server collection; a second writer is refused at once (busy_wait 0)."""
    c = store_place(request, request.param, tmp_path, busy_wait=0.0)
    local = store_server.TEST_CLIENTS.get(c.location)
    if local is None:   # a real server
        yield c
        drop(c)
        return
    url = f"http://serialized-{uuid.uuid4().hex[:8]}.invalid:6333"
    store_server.TEST_CLIENTS[url] = Serialized(local)
    c = replace(c, url=url)
    try:
        yield c
        drop(c)
    finally:
        del store_server.TEST_CLIENTS[url]


def leases(cfg: StoreConfig) -> list[dict]:
    """The lease points in the collection's companion, as stored."""
    with backend(cfg) as b:
        recs, _ = b.client.scroll(cfg.collection + store_server.META_SUFFIX, limit=100,
                                  scroll_filter=models.Filter(must=[models.FieldCondition(
                                      key="name", match=models.MatchValue(value=LEASE))]))
    return [dict(r.payload, token=str(r.id)) for r in recs]


def forge(cfg: StoreConfig, **note: Any) -> str:
    """Write a lease point as another writer (another host) would have; returns its token."""
    token = str(uuid.uuid4())
    now = time.time()
    payload = {"name": LEASE, "host": "gpu-node-7", "pid": 4242, "cmd": "idx build",
               "since": now - 3600, "expires": now + TTL, "held": True, **note}
    with backend(cfg) as b:
        b.client.upsert(cfg.collection + store_server.META_SUFFIX, wait=True, points=[
            models.PointStruct(id=token, vector=[1.0], payload=payload)])
    return token


def hhmmss(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def test_second_writer_is_refused_with_the_holder_until_the_first_closes(cfg):
    first = open_store(cfg)
    first.ensure(META)
    first.upsert(make_points(5)[0])
    first.put_doc("shards", {"a.tar": {"done": True}})
    second = open_store(cfg)   # opening is reading: never refused
    with pytest.raises(StoreBusy) as ei:
        second.ensure(META)
    msg = str(ei.value)
    assert "\n" not in msg and "in use by another process" in msg
    assert f"host {socket.gethostname()}, pid {os.getpid()}" in msg
    assert f"since {time.strftime('%Y-%m-%d', time.localtime(first.lease.since))}" in msg
    assert f"its lease expires {hhmmss(first.lease.expires)} unless renewed" in msg
    # every write is refused, not only ensure(): nothing of the second writer lands
    for write in (lambda s: s.upsert(make_points(9)[0]), lambda s: s.put_doc("shards", {}),
                  lambda s: s.set_payload({make_points(1)[0][0].id: {"cluster_id": 1}}),
                  lambda s: s.delete(filter={"label": 0})):
        with pytest.raises(StoreBusy, match="in use by another process"):
            write(second)
    assert first.count() == 5 and first.get_doc("shards") == {"a.tar": {"done": True}}
    assert [n["token"] for n in leases(cfg)] == [first.lease.token]   # no leftover attempt
    first.close()
    assert leases(cfg) == []                                           # given back at close
    second.ensure(META)
    second.upsert(make_points(9)[0])
    assert second.count() == 9
    second.close()


def test_a_reader_is_never_blocked_and_takes_no_lease(cfg):
    pts, dense = make_points(20)
    with open_store(cfg) as writer:
        writer.ensure(META)
        writer.upsert(pts)
        writer.put_doc("last_run", {"indexed": 20})
        with open_store(cfg) as reader:
            assert reader.meta() == META and reader.count() == 20
            assert reader.search(dense[3], limit=1)[0].id == pts[3].id
            assert reader.get_doc("last_run") == {"indexed": 20}
            assert len(list(reader.scroll())) == 20 and not reader.lease.held
        assert [n["token"] for n in leases(cfg)] == [writer.lease.token]
        writer.upsert(pts[:3])   # the writer still holds it after a reader came and went


def test_a_live_lease_of_another_host_refuses_and_an_expired_one_is_taken_over(cfg):
    with open_store(cfg) as s:   # built once, then the writer on another host "crashed"
        s.ensure(META)
    expires = time.time() + TTL
    live = forge(cfg, expires=expires)
    with open_store(cfg) as s, pytest.raises(StoreBusy) as ei:
        s.ensure(META)
    assert (f"host gpu-node-7, pid 4242 (idx build), since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(expires - TTL - 3600))}, "
            f"its lease expires {hhmmss(expires)} unless renewed") in str(ei.value)
    with backend(cfg) as b:   # its heartbeats stopped: the expiry passes
        b.client.set_payload(cfg.collection + store_server.META_SUFFIX, {"expires": time.time() - 1},
                             points=[live], wait=True)
    with open_store(cfg) as s:
        s.ensure(META)
        s.upsert(make_points(4)[0])
        notes = leases(cfg)
        assert [n["token"] for n in notes] == [s.lease.token]   # the expired one is gone
        assert notes[0]["held"] and notes[0]["pid"] == os.getpid()
        assert notes[0]["expires"] > time.time()
        assert s.count() == 4
    assert leases(cfg) == []


def test_a_writer_whose_lease_was_taken_over_stops_writing(cfg):
    """A writer suspended past its lease's expiry (simulated: its expiry set in the past, its
    heartbeat stopped) finds out before its next write, and does not write."""
    a = open_store(cfg)
    a.ensure(META)
    a.upsert(make_points(3)[0])
    a.lease._stop_beating()
    past = time.time() - 1
    with backend(cfg) as b:
        b.client.set_payload(cfg.collection + store_server.META_SUFFIX, {"expires": past},
                             points=[a.lease.token], wait=True)
    a.lease.expires = past
    b_store = open_store(cfg)
    b_store.ensure(META)                      # takes over the expired lease
    with pytest.raises(StoreError, match="stopped writing, another writer took over its lease"):
        a.upsert(make_points(50)[0])
    assert b_store.count() == 3
    a.close()                                 # gives back nothing: the lease is not its own
    assert [n["token"] for n in leases(cfg)] == [b_store.lease.token]
    b_store.close()


def test_writers_that_start_together_never_both_hold_it(cfg):
    """Six writers race for the lease at once, five rounds: the calls interleave at request
    granularity (the atomicity a server gives), and never do two of them hold it."""
    with open_store(cfg) as s:
        s.ensure(META)
    for _ in range(5):
        stores = [open_store(cfg) for _ in range(6)]
        start, holders = threading.Barrier(len(stores)), []

        def race(s: Any) -> None:
            start.wait()
            try:
                s.ensure(META)
                holders.append(s.lease.token)
            except StoreBusy:
                pass

        threads = [threading.Thread(target=race, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(holders) <= 1
        assert [n["token"] for n in leases(cfg)] == holders   # the losers withdrew
        for s in stores:
            s.close()
        assert leases(cfg) == []


def test_the_heartbeat_renews_the_lease(cfg):
    s = open_store(cfg)
    s.lease.ttl = 0.4                         # a renewal every 0.1 s
    s.ensure(META)
    first = s.lease.expires
    deadline = time.monotonic() + 60          # a generous failure bound, not a speed
    while s.lease.expires == first and time.monotonic() < deadline:
        time.sleep(0.02)
    s.lease._stop_beating()
    assert s.lease.expires > first and not s.lease.lost
    assert leases(cfg)[0]["expires"] == pytest.approx(s.lease.expires)
    s.close()


def test_a_build_holds_the_lease_from_its_first_write_to_its_end(cfg, mini_shard,
                                                                  tiny_ckpt):
    from phisearch.indexer.ingest.pipeline import BuildConfig, build
    from phisearch.indexer.model.config import PhiConfig

    calls, refused = [], []

    def second_writer(progress: dict) -> None:   # called mid-build, after each batch
        calls.append(progress)
        with open_store(cfg) as other:
            try:
                other.ensure(META)
            except StoreBusy as e:
                refused.append(str(e))

    summary = build(BuildConfig(data=(mini_shard,), store=cfg, checkpoint=tiny_ckpt,
                                phi=PhiConfig(sigma=0.2, draws=2, seed=0), batch_size=50,
                                workers=0, device="cpu"), on_progress=second_writer)
    assert summary["indexed"] == 100
    assert len(calls) >= 2 and len(refused) == len(calls) and all(f"pid {os.getpid()} (" in m for m in refused)
    assert leases(cfg) == []   # given back at the end
    with open_store(cfg) as s:
        assert s.count() == 100


def test_idx_build_against_a_held_collection_exits_1_with_one_line(cfg, mini_shard, tiny_ckpt,
                                                                   monkeypatch, capsys):
    from phisearch.indexer.cli import build as build_cli
    from phisearch.ui.cli import main

    plain = build_cli.store_config
    monkeypatch.setattr(build_cli, "store_config", lambda *a, **kw: plain(*a, busy_wait=0.0, **kw))
    monkeypatch.setenv("PHISEARCH_NO_PROGRESS", "1")
    argv = ["idx", "build", "--data", mini_shard, "--checkpoint", tiny_ckpt, "--draws", "2",
            "--workers", "0", "--device", "cpu", "--json", "--qdrant-url", cfg.url,
            "--collection", cfg.collection]
    monkeypatch.setattr(sys, "argv", argv)
    holder = open_store(cfg)
    holder.ensure(META)
    try:
        with pytest.raises(SystemExit) as ei:
            main()
        err = capsys.readouterr().err
        assert ei.value.code == 1
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "in use by another process" in lines[0]
        assert f"pid {os.getpid()}" in lines[0] and "its lease expires" in lines[0]
    finally:
        holder.close()


def test_idx_cluster_is_refused_before_any_clustering_work(cfg, monkeypatch):
    """`idx cluster` claims the lease before it reads a vector: a busy collection refuses it at
    once (out of claim_write), not after the clustering was computed, and nothing is written."""
    from phisearch.indexer.manage import cluster as clustering

    with open_store(cfg) as s:
        s.ensure(META)
        s.upsert(make_points(40)[0])
    entered: list[str] = []
    for name in ("read_vectors", "project", "fit_assign", "write_labels"):
        def entering(*a: Any, _name: str = name, _real: Any = getattr(clustering, name),
                     **kw: Any) -> Any:
            entered.append(_name)
            return _real(*a, **kw)
        monkeypatch.setattr(clustering, name, entering)
    holder = open_store(cfg)   # a running build, as far as the lease goes
    holder.ensure(META)
    try:
        with pytest.raises(StoreBusy, match="in use by another process") as ei:
            clustering.cluster(cfg, clustering.ClusterConfig(method="kmeans", k=3))
        assert entered == []
        assert "claim_write" in [entry.name for entry in ei.traceback]
        assert [n["token"] for n in leases(cfg)] == [holder.lease.token]   # nothing left behind
        with open_store(cfg) as reader:
            assert reader.get_doc("clusters") is None
            assert all("cluster_id" not in h.payload for h in reader.scroll())
    finally:
        holder.close()
    result = clustering.cluster(cfg, clustering.ClusterConfig(method="kmeans", k=3))
    assert entered == ["read_vectors", "project", "fit_assign", "write_labels"]
    assert result["clusters"] == 3 and result["points"] == 40
    assert leases(cfg) == []   # given back at the end


def test_idx_remove_is_refused_before_it_counts_and_a_dry_run_is_not(cfg):
    """`idx remove` claims the lease before it counts, so nobody is asked to confirm a delete that
    is then refused; a dry run only reads and is answered while another writer holds it."""
    from phisearch.indexer.manage.remove import remove

    with open_store(cfg) as s:
        s.ensure(META)
        s.upsert(make_points(20)[0])
    asked: list[int] = []

    def confirm(n: int) -> bool:
        asked.append(n)
        return True

    holder = open_store(cfg)
    holder.ensure(META)
    try:
        with pytest.raises(StoreBusy, match="in use by another process") as ei:
            remove(cfg, {"label": 3}, confirm)
        assert asked == []
        assert "claim_write" in [entry.name for entry in ei.traceback]
        assert remove(cfg, {"label": 3}, confirm, dry_run=True)["matched"] == 2 and asked == []
        assert holder.count() == 20
    finally:
        holder.close()
    assert remove(cfg, {"label": 3}, confirm)["deleted"] == 2 and asked == [2]
    assert leases(cfg) == []


def test_snapshot_restore_is_refused_while_another_writer_holds_the_lease(cfg):
    """`idx snapshot restore` replaces the collection: it takes the lease first, so a running
    build makes it StoreBusy before anything is downloaded or replaced, and it leaves no lease
    point behind whatever happens next."""
    from phisearch.indexer.manage.snapshots import restore

    with open_store(cfg) as s:
        s.ensure(META)
        s.upsert(make_points(6)[0])
    holder = open_store(cfg)
    holder.ensure(META)
    try:
        with pytest.raises(StoreBusy, match="in use by another process") as ei:
            restore(cfg, "any.snapshot")
        assert "_writing" in [entry.name for entry in ei.traceback]
        assert [n["token"] for n in leases(cfg)] == [holder.lease.token]
        assert holder.count() == 6
    finally:
        holder.close()
    assert leases(cfg) == []
