"""scripts/ship_tiny.py's shipping rule and minute count, bench/recipe_score.py's rows from
parallel scorers, and bench/shipped_curve.py's table from the committed results (no network
runs)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


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


def _module(path: Path, name: str):
    sys.path.insert(0, str(REPO / "bench"))
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(REPO / "bench"))
        sys.path.remove(str(REPO / "scripts"))


def _row(tiny_val, tiny_test, nette_val=0.5, nette_test=0.5):
    """A recipe_score row: (default readout, paper's φ) kNN@10 per protocol."""
    def reps(pair):
        return {"phi": pair[0], "phi_mid_raw": pair[1]}
    return {"knn@10": {"tiny-val": reps(tiny_val), "tiny-test": reps(tiny_test),
                       "imagenette-val": reps((nette_val, 0.3)),
                       "imagenette-test": reps((nette_test, 0.3))}}


def test_a_row_scored_with_another_readout_is_scored_again():
    ship = _module(REPO / "scripts" / "ship_tiny.py", "ship_tiny")
    assert ship.READOUT == "blocks+white256+l2"    # bench/results/k_sweep_69079.json
    old = {"model_sha256": "f11229b5a4a2"}           # before the switch: K = 128, no "readout"
    new = {"model_sha256": "f11229b5a4a2", "readout": "blocks+white256+l2"}
    assert ship.scored_row([old], "f11229b5a4a2") is None
    assert ship.scored_row([old, new], "f11229b5a4a2") is new
    assert ship.scored_row([new], "0ea2d0c2de53") is None
    # --reference judges against a row at --rule-readout: a K = 128 row from before the switch
    assert ship.scored_row([old, new], "f11229b5a4a2", ship.BESIDE) is old


def test_the_rule_lines_name_the_readout_both_rows_were_scored_with():
    ship = _module(REPO / "scripts" / "ship_tiny.py", "ship_tiny")
    old, new = _row((0.097, 0.022), (0.097, 0.026)), _row((0.100, 0.022), (0.097, 0.026))
    ok, lines = ship.decide(old, new, "blocks+white128+l2")
    assert ok and lines[0].startswith("tiny blocks+white128+l2: val 0.097 -> 0.100 (+0.003)")


def test_tiny_rule_ships_on_a_tiny_validation_rise_and_refuses_a_test_fall_beyond_noise():
    ship = _module(REPO / "scripts" / "ship_tiny.py", "ship_tiny")
    old = _row((0.097, 0.022), (0.097, 0.026))
    assert ship.decide(old, _row((0.097, 0.025), (0.096, 0.026)))[0]       # φ up on val
    assert not ship.decide(old, _row((0.096, 0.022), (0.100, 0.030)))[0]   # nothing up on val
    # up on validation, but the default readout down 0.012 on tiny-test (noise 0.011)
    ok, lines = ship.decide(old, _row((0.110, 0.030), (0.085, 0.026)))
    assert not ok and "test 0.097 -> 0.085 (-0.012" in lines[0]
    # a fall of exactly the noise is not beyond it (0.309 - 0.325 is -0.016000000000000014)
    assert ship.decide(_row((0.097, 0.022), (0.100, 0.026), nette_test=0.325),
                       _row((0.111, 0.038), (0.108, 0.030), nette_test=0.309))[0]
    # an Imagenette test fall beyond its noise (0.016) also refuses
    assert not ship.decide(old, _row((0.110, 0.030), (0.100, 0.030), nette_test=0.48))[0]


def test_cpu_minutes_count_from_the_warm_start_across_resumes_and_branches():
    """A Tiny run's minutes are its train_cpu_seconds less those of the checkpoint it started
    from: recorded as `warm_start_from` by the trainer (kept when a resume no longer names it), or
    given; a run that records neither is refused by the ship script instead of counted from 0."""
    rs = _module(REPO / "bench" / "recipe_score.py", "recipe_score")
    ship = _module(REPO / "scripts" / "ship_tiny.py", "ship_tiny")
    info = {"train_cpu_seconds": 21001.1, "train": {"init_from": None},
            "warm_start_from": {"sha256": "ab", "steps": 21919, "cpu_seconds": 8320.2}}
    assert rs.arm_cpu_minutes(info) == 211.3
    assert rs.arm_cpu_minutes(info, 13881.9) == 118.7          # a decision arm from its branch
    prev = {"cpu_minutes": {"total": 657}}
    got = ship.cpu_minutes(prev, info, None)
    assert got["tiny imagenet"] == 211.3 and got["total"] == 868.3
    legacy = {"train_cpu_seconds": 21001.1, "train": {"init_from": None}}
    assert ship.cpu_minutes(prev, legacy, 8320.2)["tiny imagenet"] == 211.3
    try:
        ship.cpu_minutes(prev, legacy, None)
    except SystemExit as e:
        assert "--origin-cpu-seconds" in str(e)
    else:
        raise AssertionError("a run without its warm start was counted from zero")


def test_recipe_rows_from_parallel_scorers_are_all_kept(tmp_path):
    """Arms scored by separate processes under one --name: each adds its rows under a lock,
    reading the file afresh (before, the last writer's copy dropped the others' rows)."""
    script = (f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import recipe_score as rs\n"
              "from pathlib import Path\n"
              "for i in range(25):\n"
              "    rs.add_row(Path(sys.argv[1]), {'checkpoint': f'{sys.argv[2]}-{i}'})\n")
    out = tmp_path / "recipe_x.json"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(out), arm]) for arm in "abc"]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    rows = json.loads(out.read_text())["rows"]
    assert sorted(r["checkpoint"] for r in rows) == sorted(f"{a}-{i}" for a in "abc"
                                                           for i in range(25))
    rs = _module(REPO / "bench" / "recipe_score.py", "recipe_score")
    rs.add_row(out, {"checkpoint": "a-0", "new": True})        # the same checkpoint: replaced
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 75 and [r for r in rows if r["checkpoint"] == "a-0"] == [
        {"checkpoint": "a-0", "new": True}]
