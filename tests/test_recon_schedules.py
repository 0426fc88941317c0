"""bench/recon_schedules.py (which sampling schedule should be the default, issue 26 part 4) on
the tiny untrained checkpoint and the mini store, and the image statistics it judges samples by."""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from phisearch.search import recon_report as rr
from phisearch.search.evaluate import load_split
from phisearch.search.reconstruct import IMAGENETTE_MEAN, SCHEDULES, Schedule

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        yield importlib.import_module("recon_schedules")
    finally:
        sys.path.remove(str(REPO / "bench"))


def test_image_stats_separate_flat_grey_from_real_images(mini_shard):
    real, _, _ = load_split(mini_shard, limit=40)
    grey = np.broadcast_to(np.round(np.array(IMAGENETTE_MEAN) * 255).astype(np.uint8),
                           real.shape).copy()
    std_real, std_grey = rr.pixel_std(real), rr.pixel_std(grey)
    hf_real, hf_grey = rr.high_freq_fraction(real), rr.high_freq_fraction(grey)
    assert std_grey.max() < 1e-9 and np.all(hf_grey == 0)        # float rounding only
    assert std_real.min() > 0.02 and std_real.mean() > 0.1       # every photo has contrast
    assert np.all(hf_real > 0) and 0.2 < hf_real.mean() < 0.8     # some detail, not noise
    # A smooth blob has contrast but almost no energy above the cutoff; pixel noise has nearly
    # all of it: a value in between is what photos give.
    yy, xx = np.mgrid[:64, :64]
    bump = np.exp(-((yy - 32) ** 2 + (xx - 28) ** 2) / (2 * 12.0 ** 2))
    blob = np.stack([100 + 80 * bump, 90 + 40 * bump, 120 - 60 * bump], -1)[None]
    blob = np.round(blob).astype(np.uint8)
    assert rr.pixel_std(blob)[0] > 0.05 and rr.high_freq_fraction(blob)[0] < 0.05
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    assert rr.high_freq_fraction(noise).min() > 0.95 > hf_real.max()
    stats = rr.image_stats(real)
    assert set(stats) == {"pixel_std", "high_freq_fraction", "flat_fraction"}
    assert stats["flat_fraction"] == 0.0 and rr.image_stats(grey)["flat_fraction"] == 1.0
    assert rr.image_stats(grey)["pixel_std"] == 0.0


def test_candidate_lists_resolve(bench):
    every = bench.resolve(["all"])
    assert list(every) == list(bench.CANDIDATES) and bench.CANDIDATES["fast"] == SCHEDULES["fast"]
    for name in ("quick", "default"):
        assert set(bench.resolve([name])) <= set(every)
    mixed = bench.resolve(["fast", "paper", "fast:levels=30,sigma_max=0.7", "quick"])
    assert list(mixed)[:3] == ["fast", "paper", "fast:levels=30,sigma_max=0.7"]
    custom = mixed["fast:levels=30,sigma_max=0.7"]
    assert (custom.levels, custom.sigma_max, custom.inner_steps) == (30, 0.7, 3)
    # The row to paste as SCHEDULES["fast"] makes the same schedule.
    assert eval(bench.schedule_line(custom), {"Schedule": Schedule}) == custom
    for bad in (["nope"], ["fast:levels"], ["fast:colour=3"], ["fast:levels=many"]):
        with pytest.raises(ValueError):
            bench.resolve(bad)


def test_two_schedules_on_two_targets(bench, mini_store, mini_shard, tmp_path, capsys):
    out = tmp_path / "recon_schedules_test.json"
    bench.main(["--queries", mini_shard, "--store", str(mini_store), "--targets", "2", "-n", "1",
                "--schedules", "fast", "adaptive:levels=4,inner_steps=2", "--out", str(out),
                "--grids", str(tmp_path / "grids")])
    res = json.loads(out.read_text())
    assert res["targets"] == 2 and res["samples_per_target"] == 1 and res["points"] == 100
    real = res["real"]
    assert 0 <= real["top10_majority_is_its_class"] <= 1
    assert real["image_stats"]["pixel_std"] > 0.05 and real["image_stats"]["flat_fraction"] == 0
    rows = res["schedules"]
    assert [r["name"] for r in rows] == ["fast", "adaptive:levels=4,inner_steps=2"]
    assert rows[0]["settings"] == asdict(SCHEDULES["fast"])
    assert rows[1]["settings"]["algorithm"] == "B" and rows[1]["settings"]["levels"] == 4
    for r in rows:
        g, u = r["guided"], r["unguided"]
        for side in (g, u):
            assert 0 <= side["top10_majority_is_target_class"] <= 1
            assert side["seconds_per_sample"] > 0 and side["median_centered_error"] >= 0
            st = side["image_stats"]
            assert 0 <= st["pixel_std"] <= 0.5 and 0 <= st["high_freq_fraction"] <= 1
            assert 0 <= st["flat_fraction"] <= 1
        assert 0 <= g["per_target_majority_of_samples"] <= 1 and g["median_phi_rel_error"] >= 0
        assert r["lift"] == pytest.approx(g["top10_majority_is_target_class"]
                                          - u["top10_majority_is_target_class"], abs=1e-3)
        assert r["guided_per_second"] == pytest.approx(
            g["top10_majority_is_target_class"] / g["seconds_per_sample"], rel=0.05, abs=1e-3)
        assert Schedule(**r["settings"]) == eval(r["python"], {"Schedule": Schedule})
    from PIL import Image

    pngs = sorted(p.name for p in (tmp_path / "grids").iterdir())
    assert pngs == ["adaptive_levels_4_inner_steps_2.png", "fast.png"]
    with Image.open(tmp_path / "grids" / "fast.png") as im:     # 3 rows of 2 tiles, 128 px each
        assert im.size == (2 * 128 + 4, 3 * 128 + 2 * 4)
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| schedule |") and table[2].startswith("| real images")
    assert [line.split("|")[1].strip() for line in table[3:5]] == [r["name"] for r in rows]


def test_recon_fidelity_still_runs(bench, mini_store, mini_shard, tmp_path, monkeypatch, capsys):
    """recon_fidelity.py now shares its functions with recon_schedules.py: its own run still
    writes the JSON it always wrote."""
    out = tmp_path / "fid.json"
    monkeypatch.setattr(sys, "argv", ["recon_fidelity.py", "--queries", mini_shard, "--store",
                                      str(mini_store), "--targets", "2", "-n", "1",
                                      "--levels", "3", "--out", str(out)])
    sys.modules["recon_fidelity"].main()
    res = json.loads(out.read_text())
    for key in ("guided_top10_majority_is_target_class", "unguided_top10_majority_is_target_class",
                "real_image_top10_majority_is_its_class", "guided_per_target_majority_of_samples"):
        assert 0 <= res[key] <= 1, key
    assert res["targets"] == 2 and res["schedule_settings"]["levels"] == 3
    assert "| guided (1 per target, fast) |" in capsys.readouterr().out
