"""The recipe options issue 26 compares by measured runs: lr schedules with warm-up, the `focus`
noise-level distribution and training at 32x32. Each is checked by its values, and a real (tiny)
training run shows the options reach the optimizer and the checkpoint's record."""

import json
import math

import pytest
import torch
from phisearch.indexer.model import checkpoint as ckpt
from phisearch.indexer.train.loop import TrainConfig, train
from phisearch.indexer.train.schedule import LrSchedule, downscale, sample_sigmas


def tiny_cfg(mini_shard, out, steps, **kw) -> TrainConfig:
    return TrainConfig(data=(mini_shard,), out=str(out), preset="tiny", batch_size=8,
                       max_steps=steps, dtype="fp32", workers=0, device="cpu", **kw)


def test_cosine_warms_up_then_decays_to_zero_over_the_planned_steps():
    s = LrSchedule("cosine", base=1e-3, warmup=10, steps=110, start=1000)
    assert s(1000, 0) == pytest.approx(1e-4)            # first warm-up step: base / warmup
    assert s(1009, 0) == pytest.approx(1e-3)            # last warm-up step: base
    assert s(1010, 0) == pytest.approx(1e-3)            # decay starts at base
    assert s(1060, 0) == pytest.approx(5e-4)            # half way through the decay
    assert s(1110, 0) == pytest.approx(0.0, abs=1e-12)  # the end of the planned run ...
    assert s(5000, 0) == pytest.approx(0.0, abs=1e-12)  # ... and after it
    lin = LrSchedule("linear", base=1e-3, warmup=0, steps=100, start=0)
    assert [lin(k, 0) for k in (0, 25, 100)] == pytest.approx([1e-3, 7.5e-4, 0.0])


def test_halve_is_the_papers_schedule_and_bad_schedules_are_refused():
    s = LrSchedule("halve", base=1e-3, halve_every_epochs=3)
    assert [s(0, e) for e in (0.0, 2.99, 3.0, 6.5)] == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4])
    with pytest.raises(ValueError, match="needs --schedule-steps"):
        LrSchedule("cosine", base=1e-3, warmup=100, steps=50)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        LrSchedule("step", base=1e-3)


def test_focus_puts_two_thirds_of_the_draws_where_phi_is_read_and_sampling_starts():
    s = sample_sigmas(300_000, torch.Generator().manual_seed(0), "focus")
    assert 0 <= float(s.min()) and float(s.max()) <= 1
    read = float(((s >= 0.1) & (s <= 0.4)).float().mean())
    start = float((s >= 0.6).float().mean())
    # a third each from the two windows, plus the paper's own share of them
    assert read == pytest.approx(1 / 3 + (math.sqrt(0.4) - math.sqrt(0.1)) / 3, abs=0.005)
    assert start == pytest.approx(1 / 3 + (1 - math.sqrt(0.6)) / 3, abs=0.005)
    paper = sample_sigmas(300_000, torch.Generator().manual_seed(0), "paper")
    assert read > 1.3 * float(((paper >= 0.1) & (paper <= 0.4)).float().mean())


def test_downscale_is_an_area_average():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(1, 3, 1, 1)
    y = downscale(x, 2)
    assert y.shape == (1, 3, 2, 2)
    assert y[0, 0].tolist() == [[2.5, 4.5], [10.5, 12.5]]
    assert downscale(x, 4) is x
    with pytest.raises(ValueError, match="must divide"):
        downscale(x, 3)


def test_a_warm_start_with_a_cosine_schedule_decays_over_its_own_run_and_resumes_it(
        tmp_path, tiny_checkpoint, mini_shard):
    start = json.loads(tiny_checkpoint.with_suffix(".json").read_text())["steps"]
    cfg = dict(init_from=str(tiny_checkpoint), lr=1e-3, lr_schedule="cosine", warmup_steps=2,
               schedule_steps=6)
    train(tiny_cfg(mini_shard, tmp_path, start + 3, **cfg))
    t_info = ckpt.load(tmp_path / "model.safetensors").info
    assert t_info["train"]["lr_schedule"] == "cosine" and t_info["train"]["schedule_steps"] == 6
    # the resume continues the same schedule (its start is the warm start's step, not 0)
    from phisearch.indexer.train.loop import Trainer

    t = Trainer(tiny_cfg(mini_shard, tmp_path, start + 6, **cfg))
    assert t.state["schedule_start"] == start and t.state["step"] == start + 3
    assert t.lr() == pytest.approx(t.schedule(start + 3, 0))
    train(tiny_cfg(mini_shard, tmp_path, start + 6, **cfg))
    t = Trainer(tiny_cfg(mini_shard, tmp_path, start + 6, **cfg))
    assert t.state["step"] == start + 6 and t.lr() == pytest.approx(0.0, abs=1e-12)


def test_training_at_32_feeds_the_network_32x32_and_it_still_denoises_64x64(tmp_path,
                                                                            mini_shard):
    from phisearch.indexer.train.loop import Trainer, load_images

    t = Trainer(tiny_cfg(mini_shard, tmp_path, 1, resolution=32, compile=False))
    shapes: list[tuple[int, ...]] = []
    t.model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    x = torch.from_numpy(load_images([mini_shard], 8)).permute(0, 3, 1, 2).float() / 255
    t.step(x)
    assert shapes == [(8, 3, 32, 32)]
    path = train(tiny_cfg(mini_shard, tmp_path / "run", 3, resolution=32,
                          test_data=(mini_shard,), eval_images=16))
    info = ckpt.load(path).info
    assert info["train"]["resolution"] == 32
    assert set(info["psnr"]) >= {"0.1", "0.4"}   # measured on the 64x64 test images


def test_a_branch_keeps_adam_and_counters_and_starts_its_own_schedule(tmp_path, mini_shard):
    from phisearch.indexer.train.loop import Trainer
    from phisearch.indexer.train.state import branch

    trunk, side = tmp_path / "trunk", tmp_path / "side"
    train(tiny_cfg(mini_shard, trunk, 4, ema=0.9))
    meta = branch(trunk, side)
    assert meta["step"] == 4 and meta["schedule_start"] is None
    cos = {"lr": 1e-3, "lr_schedule": "cosine", "warmup_steps": 2, "schedule_steps": 4, "ema": 0.9}
    t = Trainer(tiny_cfg(mini_shard, side, 8, **cos))
    a = Trainer(tiny_cfg(mini_shard, trunk, 8, ema=0.9))
    assert t.state["step"] == 4 and t.state["schedule_start"] == 4    # its schedule starts here
    assert t.state["cpu_seconds"] == a.state["cpu_seconds"] > 0        # the trunk's CPU time
    assert t.lr() == pytest.approx(5e-4)                               # warm-up step 1 of 2
    for p, q in zip(t.model.parameters(), a.model.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(t.opt.state[p]["exp_avg_sq"], a.opt.state[q]["exp_avg_sq"])
    with pytest.raises(FileExistsError):
        branch(trunk, side)
    with pytest.raises(FileNotFoundError):
        branch(tmp_path / "none", tmp_path / "x")


def test_a_kept_run_resumes_exactly_and_a_copy_between_saves_is_refused(tmp_path, mini_shard):
    """A run kept in the repository (scripts/keep_run.py) comes back as the same run: steps,
    CPU time, weights and Adam's moments; a folder whose files disagree on the step (the trainer
    caught between saves) is not kept; a restore never overwrites a run."""
    from phisearch.indexer.train.loop import Trainer
    from phisearch.indexer.train.state import keep, restore, saved_steps

    run, kept, back = tmp_path / "run", tmp_path / "kept" / "run", tmp_path / "back"
    train(tiny_cfg(mini_shard, run, 4, ema=0.9))
    assert keep(run, kept) == 4
    assert saved_steps(kept) == {"model": 4, "ema": 4, "state": 4}
    assert restore(kept, back) == 4
    a, b = Trainer(tiny_cfg(mini_shard, run, 8, ema=0.9)), Trainer(tiny_cfg(mini_shard, back, 8, ema=0.9))
    assert b.state["step"] == 4 and b.state["cpu_seconds"] == a.state["cpu_seconds"] > 0
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(a.opt.state[p]["exp_avg"], b.opt.state[q]["exp_avg"])
    with pytest.raises(FileExistsError):
        restore(kept, back)
    info = json.loads((run / "ema.json").read_text())
    (run / "ema.json").write_text(json.dumps({**info, "steps": 3}))
    with pytest.raises(RuntimeError, match="do not agree"):
        keep(run, tmp_path / "kept" / "other", tries=2, wait=0.01)
    assert not (tmp_path / "kept" / "other").exists()


def test_compiles_by_default_only_runs_of_ten_minutes_or_more(mini_shard, tmp_path):
    """torch.compile costs about a minute, so a run compiles by default when it will last 10+
    minutes: by --minutes, or by its steps left at the probed seconds per step (the probe runs
    when --dtype is auto); an explicit --compile/--no-compile always wins. Compiling is lazy:
    nothing here compiles."""
    from itertools import count

    from phisearch.indexer.train.loop import Trainer
    runs = count()

    def trainer(steps: int, **kw) -> Trainer:
        cfg = TrainConfig(data=(mini_shard,), out=str(tmp_path / f"r{next(runs)}"), preset="tiny",
                          batch_size=8, max_steps=steps, workers=0, device="cpu",
                          **{"dtype": "fp32", **kw})
        return Trainer(cfg)

    assert trainer(10, minutes=10).record["compiled"]
    assert not trainer(10, minutes=5).record["compiled"]
    assert not trainer(10**9).record["compiled"]      # explicit dtype: no probe, no step time
    t = trainer(10**9, dtype="auto")
    assert t.record["compiled"] and 10**9 * t.speed[t.mode.label] >= 600
    assert not trainer(2, dtype="auto").record["compiled"]   # 2 steps: well under 10 minutes
    assert not trainer(10**9, minutes=10, compile=False).record["compiled"]
    assert trainer(2, compile=True).record["compiled"]
