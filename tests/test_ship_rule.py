"""scripts/ship_small64.py's shipping rule on the sweeps that decided earlier checkpoints, and
bench/shipped_curve.py's table from the committed results (no network runs: both read JSON)."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def _ship_module():
    spec = importlib.util.spec_from_file_location("ship_small64",
                                                  REPO / "scripts" / "ship_small64.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rule_reproduces_the_recorded_decisions():
    ship = _ship_module()
    # 10,588 steps: validation up for the default readout (+0.019) but test down 0.019 > noise.
    ok, lines = ship.decide(json.loads((RESULTS / "draws_sweep_10588.json").read_text()),
                            "small64-10588 (", "blocks+white128+l2")
    assert not ok and "(+0.019)" in lines[1] and "(-0.019)" in lines[1]
    # 11,738 steps: the paper's φ up on validation (+0.013), nothing down on test beyond noise.
    sweep = json.loads((RESULTS / "draws_sweep_11738.json").read_text())
    ok, lines = ship.decide(sweep, "small64-11738 (", "blocks+white128+l2")
    assert ok and lines[0].startswith("mid: val 0.281 -> 0.294")
    # The same sweep with the candidate's paper's φ 0.02 lower on test: refused.
    worse = copy.deepcopy(sweep)
    for r in worse["rows"]:
        if r["net"].startswith("small64-11738") and r["readout"] == "mid":
            r["test"]["knn@10"] -= 0.04
    assert not ship.decide(worse, "small64-11738 (", "blocks+white128+l2")[0]


def test_shipped_curve_table_from_committed_results(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "bench" / "shipped_curve.py"),
                        "--png", str(tmp_path / "c.png")], check=False, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| ")]
    steps = [ln.split("|")[1].strip() for ln in rows[1:]]
    assert steps[:2] == ["6,425", "8,876"]
    assert steps[-2:] == ["untrained (same code)", "16x16 pixels"]
    assert "| 11,738 | 27.54 | 0.316 (0.294) | 0.560 (0.549) |" in rows
    assert (tmp_path / "c.png").stat().st_size > 10_000
