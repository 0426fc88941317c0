import itertools
import json

import numpy as np
import pytest
import torch
from phisearch.indexer.model import checkpoint as ckpt
from phisearch.indexer.train.denoise_eval import EVAL_SIGMAS, denoise_eval
from phisearch.indexer.train.loop import TrainConfig, load_images, sample_sigmas, train


def tiny_cfg(mini_shard, out, steps, **kw) -> TrainConfig:
    return TrainConfig(data=(mini_shard,), out=str(out), preset="tiny", batch_size=8,
                       max_steps=steps, dtype="fp32", workers=0, device="cpu", **kw)


def _state_cpu_seconds(out) -> float:
    """The run's CPU seconds as the state keeps them (unrounded)."""
    from safetensors import safe_open

    with safe_open(str(out / "train_state.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["meta"])["cpu_seconds"]


def test_loss_goes_down(tmp_path, mini_shard):
    losses: list[tuple[int, float]] = []
    path = train(tiny_cfg(mini_shard, tmp_path, 30), on_step=lambda s, v: losses.append((s, v)))
    assert [s for s, _ in losses] == list(range(1, 31))
    first, last = np.mean([v for _, v in losses[:5]]), np.mean([v for _, v in losses[-5:]])
    assert last < 0.6 * first, (first, last)
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["steps"] == 30 and info["images_seen"] == 240 and info["preset"] == "tiny"
    assert info["data"]["samples"] == 100  # from the folder's manifest.json
    for step in (0, 1, 2, 5, 10, 20):
        assert (tmp_path / "curve" / f"step-{step:07d}.safetensors").is_file()
    assert not (tmp_path / "curve" / f"step-{30:07d}.safetensors").exists()
    assert ckpt.load(tmp_path / "curve" / "step-0000005.safetensors").info["steps"] == 5


def test_resume_continues(tmp_path, mini_shard, monkeypatch):
    # A counting CPU clock (0.5 s a reading, two readings a step): the accounting is checked by
    # its values, which a fast host's few milliseconds a step would round away.
    from phisearch.indexer.train import loop

    monkeypatch.setattr(loop, "cpu_clock", itertools.count(0.0, 0.5).__next__)
    train(tiny_cfg(mini_shard, tmp_path, 5))
    first = json.loads((tmp_path / "model.json").read_text())
    assert first["steps"] == 5 and first["train_cpu_from_step"] == 0
    assert first["train_cpu_seconds"] == _state_cpu_seconds(tmp_path) == 2.5
    assert (tmp_path / "train_state.safetensors").is_file()
    steps: list[int] = []
    train(tiny_cfg(mini_shard, tmp_path, 8), on_step=lambda s, v: steps.append(s))
    assert steps == [6, 7, 8]
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["steps"] == 8 and info["images_seen"] == 64
    # CPU time of the steps carries over a resume and keeps counting from the first step.
    assert info["train_cpu_from_step"] == 0
    assert info["train_cpu_seconds"] == _state_cpu_seconds(tmp_path) == 4.0
    for step in (0, 1, 2, 5):
        assert (tmp_path / "curve" / f"step-{step:07d}.safetensors").is_file()


def test_warm_start_from_a_checkpoint_saves_and_keeps_its_preset(tmp_path, tiny_checkpoint,
                                                                  mini_shard):
    """--resume C (weights only, Adam restarts): steps continue from C's count, and the run
    saves like any other (a warm start once failed at its first save)."""
    start = json.loads(tiny_checkpoint.with_suffix(".json").read_text())["steps"]
    steps: list[int] = []
    path = train(tiny_cfg(mini_shard, tmp_path, start + 2, init_from=str(tiny_checkpoint),
                          save_every_minutes=0.0001), on_step=lambda s, v: steps.append(s))
    assert steps == [start + 1, start + 2]
    c = ckpt.load(path)
    assert c.info["preset"] == "tiny" and c.info["steps"] == start + 2
    assert c.info["train"]["init_from"] == str(tiny_checkpoint)
    assert (tmp_path / "train_state.safetensors").is_file()
    # The run's own compute counts from the warm start, also after a resume that no longer
    # names it (what the Tiny ImageNet CPU-minutes of a shipped model are measured from).
    origin = ckpt.load(tiny_checkpoint)
    expect = {"sha256": origin.sha256, "steps": start,
              "cpu_seconds": origin.info.get("train_cpu_seconds", 0.0)}
    assert c.info["warm_start_from"] == expect
    train(tiny_cfg(mini_shard, tmp_path, start + 3))
    again = json.loads((tmp_path / "model.json").read_text())
    assert again["train"]["init_from"] is None and again["warm_start_from"] == expect


def test_sigma_distributions():
    """paper: √σ uniform (mean 1/3, P(σ > 0.5) = 1 - √0.5); uniform: mean 1/2, P(σ > 0.5) = 1/2."""
    paper = sample_sigmas(200_000, torch.Generator().manual_seed(0))
    flat = sample_sigmas(200_000, torch.Generator().manual_seed(0), "uniform")
    assert 0 <= paper.min() and paper.max() <= 1 and 0 <= flat.min() and flat.max() <= 1
    assert abs(paper.mean().item() - 1 / 3) < 0.005 and abs(flat.mean().item() - 0.5) < 0.005
    assert abs((paper > 0.5).float().mean().item() - (1 - 0.5 ** 0.5)) < 0.005
    assert abs((flat > 0.5).float().mean().item() - 0.5) < 0.005
    with pytest.raises(ValueError, match="sigma distribution"):
        sample_sigmas(4, torch.Generator(), "log")


def test_wide_sigmas_reach_where_reconstruction_starts():
    """wide: a quarter above σ 1 (log-uniform up to 5: median √5), the rest as focus draws."""
    wide = sample_sigmas(200_000, torch.Generator().manual_seed(0), "wide")
    assert 0 <= wide.min() and wide.max() <= 5.0
    high = wide[wide > 1]
    assert abs(high.numel() / wide.numel() - 0.25) < 0.005
    assert abs(high.median().item() - 5 ** 0.5) < 0.02
    assert abs(((wide >= 0.1) & (wide <= 0.4)).float().mean().item()
               - (0.25 + 0.25 * (0.4 ** 0.5 - 0.1 ** 0.5))) < 0.005


def test_sigma_dist_is_recorded(tmp_path, mini_shard):
    path = train(tiny_cfg(mini_shard, tmp_path, 2, sigma_dist="uniform"))
    assert json.loads(path.with_suffix(".json").read_text())["train"]["sigma_dist"] == "uniform"


@pytest.fixture(scope="module")
def eval_table(tiny_checkpoint, mini_shard):
    model = ckpt.load(tiny_checkpoint).model
    return denoise_eval(model, load_images([mini_shard], 64))


def test_denoise_eval_table(eval_table):
    assert list(eval_table) == [str(float(s)) for s in EVAL_SIGMAS] == ["0.05", "0.1", "0.2", "0.4"]
    for row in eval_table.values():
        assert set(row) == {"noisy", "denoised", "baseline"}
        assert all(isinstance(v, float) and np.isfinite(v) for v in row.values())
    # PSNR of x + 0.1 z against x is 20 dB; each doubling of σ costs 6 dB
    assert abs(eval_table["0.1"]["noisy"] - 20.0) < 0.5
    assert abs(eval_table["0.05"]["noisy"] - eval_table["0.1"]["noisy"] - 6.02) < 0.3
    # the best Gaussian blur beats the noisy input at every σ (it is a real baseline)
    assert all(r["baseline"] > r["noisy"] for r in eval_table.values())


def test_denoise_eval_is_deterministic(tiny_checkpoint, mini_shard):
    model = ckpt.load(tiny_checkpoint).model
    imgs = load_images([mini_shard], 16)
    assert denoise_eval(model, imgs, sigmas=(0.2,)) == denoise_eval(model, imgs, sigmas=(0.2,))
    assert torch.is_grad_enabled()  # the no_grad decorator does not leak


def test_resume_restores_adam_moments_and_the_noise_generator(tmp_path, mini_shard):
    from phisearch.indexer.train.loop import Trainer
    from safetensors import safe_open

    train(tiny_cfg(mini_shard, tmp_path, 4))
    with safe_open(str(tmp_path / "train_state.safetensors"), framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    t = Trainer(tiny_cfg(mini_shard, tmp_path, 8))   # the resume path, stopped before a step
    moments = [t.opt.state[p]["exp_avg_sq"] for p in t.opt.param_groups[0]["params"]]
    assert len(moments) == sum(k.endswith("exp_avg_sq") for k in saved) > 0
    assert all(torch.equal(m, saved[f"{i}.exp_avg_sq"]) for i, m in enumerate(moments))
    assert float(t.opt.state[t.opt.param_groups[0]["params"][0]]["step"]) == 4
    assert torch.equal(t.gen.get_state(), saved["generator"])   # the noise stream continues
    assert t.state["step"] == 4


def test_progress_reports_every_two_seconds_not_every_step(tmp_path, mini_shard):
    """After the first step's report, reports are at least 2 s apart, so there are at most
    2 + elapsed / 2 of them: true on a host of any speed, and false for a report per step
    whenever a step takes under 2 s (20 steps: more reports than that bound allows, and some
    closer than 2 s)."""
    import time

    calls: list[float] = []
    t0 = time.monotonic()
    train(tiny_cfg(mini_shard, tmp_path, 20), progress=lambda p: calls.append(time.monotonic()))
    elapsed = time.monotonic() - t0
    assert calls and len(calls) <= 2 + elapsed / 2, (len(calls), elapsed)
    assert all(b - a >= 1.99 for a, b in itertools.pairwise(calls[1:])), calls


def test_cpu_step_probe_times_every_mode_and_the_run_records_it(tmp_path, mini_shard):
    from phisearch.indexer.model.config import preset
    from phisearch.indexer.model.unet import UNet
    from phisearch.indexer.train.speed import CANDIDATES, probe

    mode, times = probe(UNet(preset("tiny")), 4)
    assert set(times) == {m.label for m in CANDIDATES} and times[mode.label] is not None
    assert times[mode.label] == min(v for v in times.values() if v is not None)
    path = train(TrainConfig(data=(mini_shard,), out=str(tmp_path), preset="tiny", batch_size=4,
                             max_steps=2, workers=0, device="cpu"))   # dtype auto: probed
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["step_mode"] in times and set(info["speed_probe"]) == set(times)


def test_ema_is_the_moving_average_of_the_weights_and_survives_a_resume(tmp_path, mini_shard):
    """--ema d: ema.safetensors holds w̄ ← d·w̄ + (1 − d)·w after each step, started at the
    first step's weights; a resume continues that average from the file, not from scratch."""
    train(tiny_cfg(mini_shard, tmp_path, 1, ema=0.5))
    w1 = ckpt.load(tmp_path / "model.safetensors").model.state_dict()
    e1 = ckpt.load(tmp_path / "ema.safetensors")
    assert e1.info["ema_decay"] == 0.5 and e1.info["steps"] == 1
    for k, v in e1.model.state_dict().items():      # the first update copies the weights
        assert torch.equal(v, w1[k]), k
    train(tiny_cfg(mini_shard, tmp_path, 2, ema=0.5))          # a resume: one more step
    w2 = ckpt.load(tmp_path / "model.safetensors").model.state_dict()
    e2 = ckpt.load(tmp_path / "ema.safetensors").model.state_dict()
    moved = 0
    for k, v in e2.items():
        assert torch.allclose(v, 0.5 * w1[k] + 0.5 * w2[k], atol=1e-6), k
        moved += int(not torch.equal(w1[k], w2[k]))
    assert moved > 0
    with pytest.raises(ValueError, match="ema"):
        train(tiny_cfg(mini_shard, tmp_path / "bad", 1, ema=1.0))


def test_a_save_stopped_between_its_files_resumes_with_counters_that_match_the_weights(
        tmp_path, mini_shard, caplog):
    """A stop after model.safetensors was written but before the moving average and the state
    were (what a kill during the final evaluation used to leave): the resume counts from the
    weights' step, says which files disagree, and does not train those steps a second time."""
    train(tiny_cfg(mini_shard, tmp_path, 3, ema=0.5))
    stale = {n: (tmp_path / n).read_bytes()
             for n in ("train_state.safetensors", "ema.safetensors", "ema.json")}
    train(tiny_cfg(mini_shard, tmp_path, 5, ema=0.5))
    for name, data in stale.items():          # the files the stop did not reach
        (tmp_path / name).write_bytes(data)
    steps: list[int] = []
    with caplog.at_level("WARNING"):
        train(tiny_cfg(mini_shard, tmp_path, 7, ema=0.5), on_step=lambda s, v: steps.append(s))
    assert steps == [6, 7]
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["steps"] == 7 and info["images_seen"] == 56
    assert "model.safetensors is at step 5 but train_state.safetensors at step 3" in caplog.text
    assert "moving average up to step 3" in caplog.text
    assert json.loads((tmp_path / "ema.json").read_text())["steps"] == 7
