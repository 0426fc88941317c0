"""idx analyze: SPEC §3's figures and report.html from the mini shard and a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from phisearch.indexer.model import checkpoint as ckpt
from phisearch.indexer.model.phi import participation_ratio
from phisearch.search import analysis
from phisearch.search import analyze as an
from typer.testing import CliRunner

FIGURES = ("pr_blocks.png", "stability.png", "channel_pr.png", "top_channels.png",
           "subspaces.png")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("analyze") / "tiny.safetensors"
    ckpt.save(ckpt.untrained("tiny", seed=1).model, path, preset_name="tiny")
    return str(path)


def test_participation_ratio_and_cosine():
    c = 16
    one_hot = np.eye(c)[:3]
    assert np.allclose(participation_ratio(one_hot), 1 / c)
    assert np.allclose(participation_ratio(np.ones((2, c))), 1.0)
    assert np.isnan(participation_ratio(np.zeros((1, c)))).all()
    half = np.r_[np.ones(c // 2), np.zeros(c // 2)]
    assert participation_ratio(half[None])[0] == pytest.approx(0.5)
    # per channel across images (axis 0): a channel on in 1 of 4 images has PR 1/4
    assert participation_ratio(np.array([[1.0], [0], [0], [0]]), axis=0)[0] == 0.25
    assert np.allclose(analysis.cosine(one_hot, one_hot), 1.0)


def test_cli_analyze_writes_figures_and_report(tiny_path, mini_shard, tmp_path, monkeypatch):
    from phisearch.ui.cli import app

    monkeypatch.setenv("PHISEARCH_NO_PROGRESS", "1")
    out = tmp_path / "report"
    res = CliRunner().invoke(app, ["analyze", "--data", mini_shard, "--checkpoint", tiny_path,
                                   "--images", "40", "--stability-images", "8", "--out",
                                   str(out), "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    for name in FIGURES:
        png = out / name
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG", name
        assert png.stat().st_size < 200_000, name
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(FIGURES)
    assert "Participation ratio" in page and "<script" not in page
    assert json.loads((out / "analysis.json").read_text())["images"] == 40
    pm = result["pr_mean"]
    assert set(pm) == set(an.TAPS) and all(0 < v <= 1 for v in pm.values())
    cos = result["stability"]["cosine"]
    assert set(cos) == set(an.BLOCKS) and all(len(v) == len(an.AnalyzeConfig().sweep)
                                              for v in cos.values())
    assert all(-1e-6 <= x <= 1 + 1e-6 for v in cos.values() for x in v)
    ch = result["channels"]
    assert ch["total"] == 16 and 1 <= len(ch["shown"]) <= 4
    g = result["groups"]
    assert g["name_a"] and g["name_b"] and g["a"] != g["b"]
    assert set(g["specific_a"]).isdisjoint(g["specific_b"])
    assert set(g["common"]).isdisjoint(g["specific_a"] + g["specific_b"])
    assert all(0 <= v <= 1 for v in g["energy"].values())
    # a missing shard is one line, exit 1
    res = CliRunner().invoke(app, ["analyze", "--data", str(tmp_path / "none.tar"),
                                   "--checkpoint", tiny_path, "--out", str(out)])
    assert res.exit_code == 1 and isinstance(res.exception, FileNotFoundError)
