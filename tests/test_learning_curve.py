"""bench/learning_curve.py on the tiny preset with the snapshots of a real (3-step) training run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from phisearch.indexer.train.loop import TrainConfig, train

REPO = Path(__file__).resolve().parent.parent


def test_learning_curve_on_tiny_run(tmp_path, mini_shard):
    run = tmp_path / "run"
    train(TrainConfig(data=(mini_shard,), out=str(run), preset="tiny", batch_size=8, max_steps=3,
                      dtype="fp32", workers=0, device="cpu", curve_steps=(0, 2)))
    assert sorted(p.name for p in (run / "curve").glob("*.safetensors")) == [
        "step-0000000.safetensors", "step-0000002.safetensors"]
    out, png = tmp_path / "curve.json", tmp_path / "curve.png"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "learning_curve.py"), "--run", str(run),
                        "--queries", mini_shard, "--gallery", mini_shard, "--limit-queries", "40",
                        "--limit-gallery", "100", "--draws", "1", "--out", str(out),
                        "--png", str(png)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    pts = res["points"]
    assert [p["steps"] for p in pts] == [0, 2, 3]        # two snapshots and the final model
    for p in pts:
        for name, m in p["series"].items():
            assert set(m) == {"knn@1", "knn@10", "nmi"}
            assert all(0.0 <= v <= 1.0 for v in m.values()), (name, m)
    # Same images and the same untrained network at every step: those lines must be flat.
    for name in ("pixels", "pixels16", "untrained mid", "untrained blocks"):
        assert len({json.dumps(p["series"][name]) for p in pts}) == 1, name
    # Step 0 is the untrained network itself (seed 0 of the same preset) only if the run used
    # that seed; what must hold is that training changed the trained series.
    assert pts[0]["model_sha256"] != pts[-1]["model_sha256"]
    assert png.stat().st_size > 10_000
    assert set(res["overtakes_knn@10"]) and res["settings"]["limit_queries"] == 40


def test_tiny_curve_fit_and_prediction(tmp_path):
    """bench/tiny_curve.py: the fit's arithmetic, the 'not at this rate' cases, and its tables
    from the committed recipe results (the shipped start and decision 1's warm arm at least)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import tiny_curve as tc
    finally:
        sys.path.remove(str(REPO / "bench"))
    xs = [0.0, 30.0, 90.0, 210.0]
    ys = [0.1 + 0.02 * math.log1p(x / 30) for x in xs]
    a, b = tc.fit(xs, ys)
    assert abs(a - 0.1) < 1e-9 and abs(b - 0.02) < 1e-9
    m = tc.minutes_to(a, b, 0.15, measured=1000.0)      # 0.1 + 0.02 ln(1 + m/30) = 0.15
    assert abs(m - 30 * math.expm1(2.5)) < 1e-6
    assert tc.minutes_to(a, b, 0.3, measured=210.0) is None      # beyond 100x what was measured
    assert tc.minutes_to(0.1, -0.01, 0.2, measured=210.0) is None   # falling
    assert tc.minutes_to(0.25, 0.0, 0.2, measured=210.0) == 0.0      # already there
    a, b = tc.fit([0.0, 100.0, 200.0], [0.1, 0.11, 0.12], "linear")     # the steady fit
    assert abs(a - 0.1) < 1e-9 and abs(b - 1e-4) < 1e-12
    assert abs(tc.minutes_to(a, b, 0.2, 200.0, "linear") - 1000.0) < 1e-6
    out = tmp_path / "c.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "tiny_curve.py"), "--out", str(out),
                        "--png", str(tmp_path / "c.png")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert [p["minutes"] for p in doc["points"]][:2] == [0.0, 55.4]
    assert doc["points"][0]["knn"]["tiny"]["phi"] == 0.09701492537313433
    assert {b["bar"] for b in doc["bars"]} >= {"Tiny default readout >= 0.20"}
    assert "| 55.4 | 29,000 | 0.096 | 0.023 | 0.572 | 0.315 |" in r.stdout
    assert (tmp_path / "c.png").stat().st_size > 10_000
