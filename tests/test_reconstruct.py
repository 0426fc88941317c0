"""Self-guided reconstruction (search/reconstruct.py) and `idx reconstruct`, on the tiny preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from phisearch.indexer.model import checkpoint as ckpt
from phisearch.indexer.model.phi import as_uint8, phi
from phisearch.indexer.sources import images
from phisearch.indexer.sources.shards import read_shard
from phisearch.search import reconstruct as rc
from PIL import Image

IDX = [sys.executable, "-m", "phisearch.ui"]
QUICK = rc.Schedule(levels=3, inner_steps=3, lr=0.03, tol=0.0, draws=2, spacing="geometric")


@pytest.fixture(scope="module")
def model():
    return ckpt.untrained("tiny", seed=1).model


@pytest.fixture(scope="module")
def mini_images(mini_shard) -> np.ndarray:
    raws = [r for r in read_shard(mini_shard) if isinstance(r, dict)][:4]
    return np.stack([images.decode(r["jpg"]) for r in raws])      # (4, 64, 64, 3) uint8


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    ckpt.save(ckpt.untrained("tiny", seed=1).model, path, {"note": "test"}, preset_name="tiny")
    return str(path)


def test_sigma_matched_shapes_range_and_callback(model, mini_images):
    seen = []
    rec = rc.reconstruct(model, images=mini_images[:1], n=3, sch=QUICK, seed=0,
                         callback=seen.append)
    assert rec.samples.shape == (3, 3, 64, 64) and rec.samples.dtype == torch.float32
    assert 0 <= float(rec.samples.min()) and float(rec.samples.max()) <= 1
    assert rec.phi_rel_error.shape == (3,) and np.isfinite(rec.phi_rel_error).all()
    assert rec.steps == 3 * 3 * 3 and rec.steps_per_sample.tolist() == [9, 9, 9]  # tol 0: all run
    assert rec.seconds > 0 and rec.levels_run == 3
    assert [d["level"] for d in seen] == [1, 2, 3]
    assert {"level", "levels", "sigma", "loss"} <= set(seen[0])
    assert seen[0]["sigma"] == pytest.approx(QUICK.sigma_max)
    assert seen[-1]["sigma"] == pytest.approx(QUICK.sigma_min)
    summary = rc.summary(rec)
    assert len(summary["phi_rel_error"]) == 3 and summary["steps"] == rec.steps
    json.dumps(summary)


def test_fixed_target_many_targets_at_once(model, mini_images):
    target = phi(model, mini_images[:2], 0.2, 2, 0)                     # (2, C)
    rec = rc.reconstruct(model, target, n=2, sch=QUICK, seed=0)
    assert rec.samples.shape == (4, 3, 64, 64)
    assert rec.target_index.tolist() == [0, 0, 1, 1]
    assert torch.equal(rec.phi_target, target)
    # the error is measured against each sample's own target
    got = phi(model, as_uint8(rec.samples), 0.2, 4, 0)                # default PhiConfig
    want = target[rec.target_index]
    np.testing.assert_allclose(rec.phi_rel_error,
                               ((got - want).norm(dim=1) / want.norm(dim=1)).numpy(), rtol=1e-4)


def test_same_seed_same_samples_other_seed_differs(model, mini_images):
    target = phi(model, mini_images[:1], 0.2, 2, 0)[0]
    a = rc.reconstruct(model, target, n=2, sch=QUICK, seed=7)
    b = rc.reconstruct(model, target, n=2, sch=QUICK, seed=7)
    c = rc.reconstruct(model, target, n=2, sch=QUICK, seed=8)
    assert torch.equal(a.samples, b.samples)
    assert not torch.allclose(a.samples, c.samples)
    assert not torch.allclose(a.samples[0], a.samples[1])            # samples differ from each other


def test_more_guidance_steps_lower_error(model, mini_images):
    target = phi(model, mini_images[1:2], 0.2, 4, 0)[0]
    sch = replace(QUICK, levels=2)
    few = rc.reconstruct(model, target, n=2, sch=replace(sch, inner_steps=1), seed=0)
    many = rc.reconstruct(model, target, n=2, sch=replace(sch, inner_steps=30), seed=0)
    # The untrained decoder's last denoising step undoes part of the match, hence the margin.
    assert np.median(many.phi_rel_error) < 0.9 * np.median(few.phi_rel_error)


def test_match_stops_each_sample_at_tol_and_freezes_it(model, mini_images):
    y = images.to_tensor_batch(mini_images[:3])
    with torch.no_grad():
        own = model.encode(y)[0].mean(dim=(-2, -1))                  # (3, C)
    target = own.clone()
    target[1:] = phi(model, mini_images[3:4], 0.3, 2, 0)               # samples 1, 2: elsewhere
    res = rc.match(model, y, target, lr=0.03, max_steps=40, tol=0.5)
    # sample 0 starts on its target: loss 0, no step, pixels untouched
    assert res.steps[0] == 0 and torch.equal(res.y[0], y[0])
    moved = res.steps[1:]
    assert (moved > 0).all()
    # a sample that reached tol stopped before max_steps, with its loss at or under tol × start
    reached = res.loss <= 0.5 * res.loss0
    assert reached[1:].any(), (res.loss, res.loss0)
    assert (res.steps[reached] < 40).all()
    assert res.batch_steps == int(res.steps.max())
    # and a stopped sample's pixels are what they were when it stopped: run again with fewer
    # steps and compare the one that stopped earliest
    i = 1 + int(torch.argmin(moved))
    again = rc.match(model, y, target, lr=0.03, max_steps=int(res.steps[i]), tol=0.5)
    assert torch.equal(again.y[i], res.y[i])


def test_algorithm_b_unconditional_and_guided(model, mini_images):
    sch = rc.Schedule(algorithm="B", levels=4, inner_steps=2, h0=0.3, beta=0.5, sigma_min=0.01,
                      draws=2)
    seen = []
    rec = rc.reconstruct(model, images=mini_images[:1], n=2, sch=sch, seed=0,
                         callback=seen.append)
    assert rec.samples.shape == (2, 3, 64, 64) and np.isfinite(rec.phi_rel_error).all()
    assert 1 <= rec.levels_run <= 4 and len(seen) == rec.levels_run
    plain = rc.reconstruct(model, n=2, sch=sch, seed=0)
    assert plain.steps == 0 and np.isnan(plain.phi_rel_error).all()


def test_schedule_presets_and_validation():
    assert rc.SCHEDULES["paper"].levels == 100 and rc.SCHEDULES["paper"].inner_steps == 100
    assert rc.schedule("fast", levels=None).levels == rc.SCHEDULES["fast"].levels
    assert rc.schedule("paper", levels=5).levels == 5
    assert rc.SCHEDULES["paper"].sigmas()[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        rc.schedule("slow")
    with pytest.raises(ValueError):
        rc.Schedule(sigma_min=2.0)
    with pytest.raises(ValueError):
        rc.Schedule(algorithm="C")


def test_targets_from_files_and_docs(tmp_path):
    good = tmp_path / "v.npy"
    np.save(good, np.ones(16, np.float32))
    assert rc.load_vector(good, 16).shape == (16,)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.ones((3, 5)))
    with pytest.raises(ValueError, match=r"need shape \(16,\)"):
        rc.load_vector(bad, 16)
    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        rc.load_vector(obj, 16)
    with pytest.raises(LookupError, match="run idx cluster first"):
        rc.cluster_centroid(None, 0)
    doc = {"clusters": [{"id": 3, "centroid_mid": [0.5] * 4}]}
    assert rc.cluster_centroid(doc, 3).tolist() == [0.5] * 4
    with pytest.raises(LookupError, match="no cluster 4"):
        rc.cluster_centroid(doc, 4)


def _env() -> dict:
    return dict(os.environ, PHISEARCH_NO_PROGRESS="1", OMP_NUM_THREADS="1")


def test_cli_image_writes_grid_and_json(tmp_path, mini_shard, tiny_path):
    raw = next(r for r in read_shard(mini_shard) if isinstance(r, dict))
    img = tmp_path / "target.jpg"
    img.write_bytes(raw["jpg"])
    out = tmp_path / "grid.png"
    r = subprocess.run(IDX + ["reconstruct", "--image", str(img), "-n", "3", "--levels", "2",
                              "--steps", "2", "--renoise", "ancestral", "--seed", "1",
                              "--sigma-max", "3", "--checkpoint", tiny_path,
                              "--out", str(out), "--json", "--device", "cpu"],
                       check=False, capture_output=True, text=True,
                       env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert len(got["phi_rel_error"]) == 3 and all(e >= 0 for e in got["phi_rel_error"])
    assert got["seconds"] > 0 and got["steps"] == 3 * 2 * 2
    assert got["schedule"]["levels"] == 2 and got["schedule"]["inner_steps"] == 2
    assert got["schedule"]["renoise"] == "ancestral" and got["schedule"]["sigma_max"] == 3.0
    with Image.open(out) as grid:
        assert grid.format == "PNG"
        assert grid.size == (4 * 128 + 3 * 4, 128)                      # target + 3 samples, 2x
        tile = np.asarray(grid.convert("RGB"))[:128, :128]
    np.testing.assert_array_equal(tile[::2, ::2], images.decode(raw["jpg"]))



def test_cli_bad_input_is_one_line(tmp_path, tiny_path, monkeypatch, capsys):
    from phisearch.ui import cli

    monkeypatch.setenv("PHISEARCH_NO_PROGRESS", "1")
    vec = tmp_path / "v.npy"
    np.save(vec, np.ones(7, np.float32))
    out = str(tmp_path / "grid.png")
    cases = [(["--vector", str(vec), "--checkpoint", tiny_path], 1, "need shape (16,)"),
             (["--vector", str(tmp_path / "none.npy"), "--checkpoint", tiny_path], 1, "no such"),
             (["--image", str(vec), "--vector", str(vec)], 2, "exactly one"),
             (["--vector", str(vec), "--schedule", "slow"], 2, "unknown schedule"),
             (["--vector", str(vec), "--renoise", "stale"], 2, "unknown renoise"),
             (["--vector", str(vec), "--sigma-max", "0.01"], 2, "sigma_min <= sigma_max")]
    for args, code, msg in cases:
        monkeypatch.setattr(sys, "argv", ["idx", "reconstruct", *args, "--out", out])
        with pytest.raises(SystemExit) as e:
            cli.main()
        err = capsys.readouterr().err
        assert e.value.code == code, err
        assert msg in err
        if code == 1:
            assert len(err.strip().splitlines()) == 1


def test_cli_stored_point_and_cluster(tmp_path, mini_shard, mini_store, monkeypatch):
    import shutil

    from phisearch.indexer.store import StoreConfig, open_store
    from phisearch.ui.cli import app
    from typer.testing import CliRunner

    cfg = StoreConfig(path=str(tmp_path / "store"), collection="phisearch")
    shutil.copytree(mini_store, cfg.path)     # σ 0.2, 2 draws, the tiny untrained network
    monkeypatch.setenv("PHISEARCH_NO_PROGRESS", "1")
    runner = CliRunner()
    base = ["--store", cfg.path, "--levels", "2", "--steps", "2", "-n", "2", "--json"]
    key = next(r for r in read_shard(mini_shard) if isinstance(r, dict))["__key__"]
    out = tmp_path / "key.png"
    res = runner.invoke(app, ["reconstruct", "--key", key, "--out", str(out)] + base)
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["target_shown"] and len(got["phi_rel_error"]) == 2
    assert got["phi"] == {"sigma": 0.2, "draws": 2, "seed": 0}       # the collection's settings
    with Image.open(out) as grid:
        assert grid.size == (3 * 128 + 2 * 4, 128)

    res = runner.invoke(app, ["reconstruct", "--cluster", "0", "--out", str(out)] + base)
    assert res.exit_code == 1 and "run idx cluster first" in str(res.exception)
    with open_store(cfg) as st:
        centroid = st.retrieve([next(iter(st.scroll(None, batch=1))).id])[0]
        mid = np.zeros(16, np.float32)
        idx, vals = centroid.sparse
        mid[idx] = vals
        st.put_doc("clusters", {"clusters": [{"id": 0, "centroid_mid": mid.tolist()}]})
    res = runner.invoke(app, ["reconstruct", "--cluster", "0", "--out", str(out)] + base)
    assert res.exit_code == 0, res.output
    assert not json.loads(res.stdout)["target_shown"]
    with Image.open(out) as grid:
        assert grid.size == (2 * 128 + 1 * 4, 128)
