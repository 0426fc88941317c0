"""`idx build` on several processes: torchrun launches one rank per GPU (or CPU slot), every rank
computes φ for its share of the shards, and rank 0 alone owns the store.

Why one writer: an Edge store allows exactly one open handle, and for a server one writer keeps
the resume record ("shards" doc) a single file with one author. Each step, every rank sends rank 0
the points of its last batch and the shards that batch completed (torch.distributed.gather_object;
a rank out of shards sends None until all are); rank 0 hands them, rank by rank, to the same
Writer thread the single-process build uses, so a shard is recorded only after its last point is
stored and a killed run resumes exactly like a single-process one. Shards are split after the
resume plan: rank r takes todo[r::world_size]. Points travel as CPU pickles over gloo (a separate
gloo group when the default group is NCCL): they are numpy arrays and JPEG thumbnails, never
device tensors. Multi-node: every node must see the shards and the checkpoint at the same paths
(a shared file system); the ranks check that they loaded the same model.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

from .embedder import Embedder
from .pipeline import (
    LAST_RUN_DOC,
    MAX_LISTED_SKIPS,
    BuildConfig,
    Writer,
    _record,
    finish_summary,
    load_records,
    make_points,
    plan,
    shard_failures,
)
from .shards import Batch, Skip, expand, folder_info, loader
from .store import IDENTITY_KEYS, PointData, StoreError, open_store

log = logging.getLogger(__name__)


class RankFailed(StoreError):
    """Another rank failed; this one stops with its message (one line)."""


def launched_by_torchrun() -> bool:
    """torchrun (and other torch.distributed launchers) set WORLD_SIZE for every rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def build_distributed(cfg: BuildConfig, on_progress: Callable[[dict], None] | None = None
                      ) -> dict | None:
    """Run on every rank (under torchrun). Returns the build summary on rank 0 (the same keys as
    pipeline.build, plus `world_size` and per-rank `ranks`), None on the other ranks."""
    import torch
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ:
        raise StoreError("--distributed needs a torch.distributed launcher: run it as "
                         "`torchrun --nproc-per-node N -m phisearch.ui build ...`")
    folders = [d for d in cfg.data if os.path.isdir(os.path.expanduser(d))]
    if folders:   # a folder's files are tracked one by one in its own record: single writer path
        raise StoreError(f"a distributed build takes shards, not folders ({folders[0]}): index "
                         "folders with a single-process idx build")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    try:
        group = dist.new_group(backend="gloo") if use_cuda else None
        return _run(cfg, on_progress, "cuda" if use_cuda else "cpu", group)
    finally:
        if owned:
            dist.destroy_process_group()


def _run(cfg: BuildConfig, on_progress: Callable[[dict], None] | None, device: str,
         group: Any) -> dict | None:
    import torch.distributed as dist

    t_start = time.perf_counter()
    me, world = dist.get_rank(), dist.get_world_size()
    urls = expand(cfg.data)
    emb = Embedder.create(cfg.checkpoint, cfg.phi, device)
    meta = emb.meta()
    idents: list[Any] = [None] * world   # every rank must have loaded the same model
    dist.all_gather_object(idents, {k: meta.get(k) for k in IDENTITY_KEYS}, group=group)
    if any(i != idents[0] for i in idents):
        bad = [r for r, i in enumerate(idents) if i != idents[0]]
        raise StoreError(f"ranks {bad} loaded another model or φ settings than rank 0 "
                         "(every node needs the same checkpoint file)")

    store = writer = None
    setup: list[Any] = [None]
    already = changed = 0
    if me == 0:
        try:
            store = open_store(cfg.store)
            store.ensure(meta)
            records = load_records(store, urls)
            todo, done_before, changed_urls = plan(urls, records)
            already, changed = len(done_before), len(changed_urls)
            stale = {}
            for url in changed_urls:   # as pipeline.build: delete the points that vanished
                ds = folder_info(url, cfg.dataset).dataset
                stale[url] = {h.id for h in store.scroll({"dataset": ds,
                                                          "shard": os.path.basename(url)})}
                log.info("shard changed since indexed: %s", url)
            previous = store.get_doc(LAST_RUN_DOC) or {}
            store.put_doc(LAST_RUN_DOC, dict(previous, pending=todo, running_since=time.time(),
                                             world_size=world))
            writer = Writer(store, records, stale)
            writer.start()
            setup = [{"todo": todo}]
        except Exception as e:
            setup = [{"error": f"{type(e).__name__}: {e}"}]
            dist.broadcast_object_list(setup, src=0, group=group)
            if store is not None:
                store.close()
            raise
    dist.broadcast_object_list(setup, src=0, group=group)
    if "error" in setup[0]:
        raise RankFailed(f"rank 0 could not open the store: {setup[0]['error']}")
    try:
        return _steps(cfg, on_progress, emb, meta, setup[0]["todo"], store, writer, group,
                      t_start, already, changed)
    finally:
        if store is not None:
            store.close()


def _steps(cfg: BuildConfig, on_progress: Callable[[dict], None] | None, emb: Embedder,
           meta: dict, todo: list[str], store: Any, writer: Writer | None, group: Any,
           t_start: float, already: int, changed: int) -> dict | None:
    """The lockstep loop: each rank embeds a batch, rank 0 gathers and writes."""
    import torch.distributed as dist

    me, world = dist.get_rank(), dist.get_world_size()
    mine = todo[me::world]
    log.info("rank %d/%d: %d of %d shards to index", me, world, len(mine), len(todo))

    per_shard: dict[str, Counter] = defaultdict(Counter)
    ids_by_shard: dict[str, set[str]] = defaultdict(set)
    t_decode = t_phi = t_comm = 0.0
    mine_indexed = indexed = 0
    skipped: Counter[str] = Counter()
    skip_list: list[dict] = []
    failed: list[dict] = []
    interrupted = False
    it = iter(loader(mine, cfg.batch_size, workers=cfg.workers, dataset=cfg.dataset)) \
        if mine else iter(())
    try:
        while True:
            msg: Any = None
            try:
                t0 = time.perf_counter()
                batch: Batch | None = next(it, None)
                t_decode += time.perf_counter() - t0
                if batch is not None:
                    points: list[PointData] = []
                    if batch.samples:
                        t0 = time.perf_counter()
                        dense, mid = emb(batch.images())
                        t_phi += time.perf_counter() - t0
                        points = make_points(batch.samples, dense, mid, meta)
                        kept = []
                        for s, p in zip(batch.samples, points):
                            if p.id in ids_by_shard[s.shard]:   # a key twice in one tar
                                batch.skips.append(Skip(s.shard, s.key, "duplicate_key",
                                                        "the first is kept"))
                                continue
                            per_shard[s.shard]["indexed"] += 1
                            ids_by_shard[s.shard].add(p.id)
                            kept.append(p)
                        points = kept
                    for s in batch.skips:
                        per_shard[s.shard]["skip:" + s.reason] += 1
                    done = [(url, _record(url, per_shard.pop(url, Counter()),
                                          ids_by_shard.pop(url, set())))
                            for url in batch.shards_done]
                    mine_indexed += len(points)
                    msg = (points, done, batch.skips, shard_failures(batch))
            except Exception as e:  # noqa: BLE001 - tell rank 0; never leave it waiting in gather
                msg = ("error", f"rank {me}: {type(e).__name__}: {e}")
                err: BaseException | None = e
            else:
                err = None
            t0 = time.perf_counter()
            gathered: list[Any] | None = [None] * world if me == 0 else None
            dist.gather_object(msg, gathered, dst=0, group=group)
            state, step_points = ["go"], 0
            if me == 0:
                state[0], step_points = _take(gathered, writer, skipped, skip_list, failed)
                indexed += step_points
            dist.broadcast_object_list(state, src=0, group=group)
            t_comm += time.perf_counter() - t0
            if err is not None:
                raise err
            if state[0].startswith("abort"):
                raise RankFailed(state[0].removeprefix("abort: "))
            if me == 0 and on_progress:
                on_progress(dict(indexed=indexed, written=writer.written,
                                 batch=step_points,
                                 skipped=sum(skipped.values())))
            if state[0] == "end":
                break
        stats: list[Any] | None = [None] * world if me == 0 else None
        dist.gather_object(dict(rank=me, indexed=mine_indexed, shards=len(mine),
                                decode_wait_s=round(t_decode, 2), phi_s=round(t_phi, 2),
                                comm_s=round(t_comm, 2)), stats, dst=0, group=group)
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: finishing the batches already received")
    finally:
        if writer is not None:
            writer.q.put(None)
            writer.join()
    if me != 0:
        if interrupted:
            raise KeyboardInterrupt
        return None
    if writer.error is not None:
        raise writer.error
    return _summary(cfg, store, writer, meta, todo, stats if not interrupted else None,
                    indexed, skipped, skip_list, t_start, t_comm, world, interrupted,
                    already, changed, failed)


def _take(gathered: list[Any], writer: Writer, skipped: Counter, skip_list: list[dict],
          failed: list[dict]) -> tuple[str, int]:
    """Rank 0: queue every rank's points and finished shards, in rank order. Returns the state
    all ranks continue with (go, end when every rank is out of shards, or abort: <why>) and the
    number of points queued."""
    for m in gathered:
        if m and m[0] == "error":
            return f"abort: {m[1]}", 0
    n = 0
    try:
        for m in gathered:
            if m is None:
                continue
            points, done, skips, failures = m
            failed += failures
            for s in skips:
                skipped[s.reason] += 1
                if len(skip_list) < MAX_LISTED_SKIPS:
                    skip_list.append(dict(shard=s.shard, key=s.key, reason=s.reason,
                                          detail=s.detail))
                log.warning("skipped %s %s: %s %s", s.shard, s.key or "", s.reason, s.detail)
            writer.put(points, done)
            n += len(points)
    except Exception as e:  # noqa: BLE001 - the writer failed: stop every rank with its message
        return f"abort: rank 0 writer: {type(e).__name__}: {e}", n
    return ("end" if all(m is None for m in gathered) else "go"), n


def _summary(cfg: BuildConfig, store: Any, writer: Writer, meta: dict, todo: list[str],
             stats: list[dict] | None, indexed: int, skipped: Counter, skip_list: list[dict],
             t_start: float, t_comm: float, world: int, interrupted: bool, already: int,
             changed: int, failed: list[dict]) -> dict:
    """pipeline.build's summary, with the stages taken over the ranks (the slowest rank's
    decode and φ time; φ throughput summed) and each rank's own figures under `ranks`."""
    stats = stats or []
    summary = finish_summary(
        cfg, store, writer, meta, indexed=indexed, skipped=skipped, skip_list=skip_list,
        t_start=t_start,
        decode_s=max((s["decode_wait_s"] for s in stats), default=0.0),
        phi_s=max((s["phi_s"] for s in stats), default=0.0),
        phi_img_per_s=round(sum(s["indexed"] / s["phi_s"] for s in stats if s["phi_s"]), 2)
        or None,
        folders={},   # shards only: the folder-file counts of a single-process build are 0
        todo=todo, already=already, changed=changed, interrupted=interrupted, failed=failed,
        extra_stages={"gather_s": round(t_comm, 2)}, world_size=world, ranks=stats)
    if interrupted:
        raise KeyboardInterrupt
    return summary
