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
from collections.abc import Callable
from typing import Any

from phisearch.indexer.ingest.pipeline import BuildConfig, collection_meta, embed_batch
from phisearch.indexer.ingest.resume import RunPlan, ShardTally, prepare_run
from phisearch.indexer.ingest.summary import RunStats, finish_summary
from phisearch.indexer.ingest.writer import Writer
from phisearch.indexer.model.embedder import Embedder
from phisearch.indexer.sources.loader import loader
from phisearch.indexer.sources.records import Batch, Skip
from phisearch.indexer.sources.shards import expand
from phisearch.indexer.store import IDENTITY_KEYS, StoreError, open_store

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
    meta = collection_meta(emb)
    idents: list[Any] = [None] * world   # every rank must have loaded the same model
    dist.all_gather_object(idents, {k: meta.get(k) for k in IDENTITY_KEYS}, group=group)
    if any(i != idents[0] for i in idents):
        bad = [r for r, i in enumerate(idents) if i != idents[0]]
        raise StoreError(f"ranks {bad} loaded another model or φ settings than rank 0 "
                         "(every node needs the same checkpoint file)")

    store = writer = run = None
    setup: list[Any] = [None]
    if me == 0:
        try:
            store = open_store(cfg.store)
            store.ensure(meta)
            run = prepare_run(store, urls, cfg.dataset, world_size=world)
            writer = Writer(store, run.records, run.stale, fingerprints=run.fingerprints)
            writer.start()
            setup = [{"todo": run.todo}]
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
                      run, RunStats(t_start=t_start))
    finally:
        if store is not None:
            store.close()


def _steps(cfg: BuildConfig, on_progress: Callable[[dict], None] | None, emb: Embedder,
           meta: dict, todo: list[str], store: Any, writer: Writer | None, group: Any,
           run: RunPlan | None, stats: RunStats) -> dict | None:
    """The lockstep loop: each rank embeds a batch, rank 0 gathers and writes. A rank's
    `stats` hold its own decode and φ time; rank 0's also what was written and skipped."""
    import torch.distributed as dist

    me, world = dist.get_rank(), dist.get_world_size()
    mine = todo[me::world]
    log.info("rank %d/%d: %d of %d shards to index", me, world, len(mine), len(todo))
    tally, mine_indexed, t_comm = ShardTally(), 0, 0.0
    it = iter(loader(mine, cfg.batch_size, workers=cfg.workers, dataset=cfg.dataset)) \
        if mine else iter(())
    try:
        while True:
            msg, err = None, None
            try:
                msg = _embed_step(it, emb, meta, tally, stats)
                mine_indexed += len(msg[0]) if msg else 0
            except Exception as e:  # noqa: BLE001 - tell rank 0; never leave it waiting in gather
                msg, err = ("error", f"rank {me}: {type(e).__name__}: {e}"), e
            t0 = time.perf_counter()
            gathered: list[Any] | None = [None] * world if me == 0 else None
            dist.gather_object(msg, gathered, dst=0, group=group)
            state, step_points = ["go"], 0
            if me == 0:
                state[0], step_points = _take(gathered, writer, stats)
                stats.indexed += step_points
            dist.broadcast_object_list(state, src=0, group=group)
            t_comm += time.perf_counter() - t0
            if err is not None:
                raise err
            if state[0].startswith("abort"):
                raise RankFailed(state[0].removeprefix("abort: "))
            if me == 0 and on_progress:
                on_progress(dict(indexed=stats.indexed, written=writer.written, batch=step_points,
                                 skipped=sum(stats.skips.counts.values())))
            if state[0] == "end":
                break
        ranks: list[Any] | None = [None] * world if me == 0 else None
        dist.gather_object(dict(rank=me, indexed=mine_indexed, shards=len(mine),
                                decode_wait_s=round(stats.decode_s, 2),
                                phi_s=round(stats.phi_s, 2), comm_s=round(t_comm, 2)),
                           ranks, dst=0, group=group)
    except KeyboardInterrupt:
        stats.interrupted = True
        log.warning("interrupted: finishing the batches already received")
    finally:
        if writer is not None:
            writer.q.put(None)
            writer.join()
    if me != 0:
        if stats.interrupted:
            raise KeyboardInterrupt
        return None
    if writer.error is not None:
        raise writer.error
    return _summary(cfg, store, writer, meta, run, stats,
                    None if stats.interrupted else ranks, t_comm, world)


def _embed_step(it, emb: Embedder, meta: dict, tally: ShardTally, stats: RunStats
                ) -> tuple | None:
    """One batch on this rank: (points, finished shard records, skips, failed shards), or
    None when the rank is out of shards. Duplicates become skips, as in pipeline.build."""
    t0 = time.perf_counter()
    batch: Batch | None = next(it, None)
    stats.decode_s += time.perf_counter() - t0
    if batch is None:
        return None
    local = RunStats()
    local.take_failures(batch)
    for s in batch.skips:
        tally.skip(s.shard, s.reason)
    kept = []
    for s, p in zip(batch.samples, embed_batch(emb, batch, meta, stats)):
        if tally.add(s.shard, p.id):
            kept.append(p)
        else:   # rank 0 counts and lists it with the other skips
            batch.skips.append(Skip(s.shard, s.key, "duplicate_key", "the first is kept"))
    return kept, tally.done(batch.shards_done), batch.skips, local.failed


def _take(gathered: list[Any], writer: Writer, stats: RunStats) -> tuple[str, int]:
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
            stats.failed += failures
            for s in skips:
                stats.skips.add(s)
            writer.put(points, done)
            n += len(points)
    except Exception as e:  # noqa: BLE001 - the writer failed: stop every rank with its message
        return f"abort: rank 0 writer: {type(e).__name__}: {e}", n
    return ("end" if all(m is None for m in gathered) else "go"), n


def _summary(cfg: BuildConfig, store: Any, writer: Writer, meta: dict, run: RunPlan,
             stats: RunStats, ranks: list[dict] | None, t_comm: float, world: int) -> dict:
    """pipeline.build's summary, with the stages taken over the ranks (the slowest rank's
    decode and φ time; φ throughput summed) and each rank's own figures under `ranks`."""
    ranks = ranks or []
    stats.decode_s = max((r["decode_wait_s"] for r in ranks), default=0.0)
    stats.phi_s = max((r["phi_s"] for r in ranks), default=0.0)
    summary = finish_summary(
        cfg.store.collection, store, writer, meta, run, stats,
        phi_img_per_s=round(sum(r["indexed"] / r["phi_s"] for r in ranks if r["phi_s"]), 2)
        or None,
        extra_stages={"gather_s": round(t_comm, 2)}, world_size=world, ranks=ranks)
    if stats.interrupted:
        raise KeyboardInterrupt
    return summary
