"""The real `idx` console script, run as a subprocess: help, usage errors, one-line errors, and the
--json output of denoise-eval; embed end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

VENV_BIN = Path(sys.executable).parent


def idx_path() -> str:
    exe = shutil.which("idx", path=os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]))
    if exe is None:
        pytest.fail("the idx console script is not installed (pip install -e .)", pytrace=False)
    return exe


def idx(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PHISEARCH_NO_PROGRESS="1", OMP_NUM_THREADS="1",
               PATH=os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]))
    return subprocess.run([idx_path(), *args], check=False, capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_help_lists_core_commands():
    r = idx("--help")
    assert r.returncode == 0, r.stderr
    for cmd in ("train", "denoise-eval", "embed"):
        assert cmd in r.stdout


def test_unknown_option_is_usage_error():
    r = idx("train", "--bogus")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "--bogus" in r.stderr


def test_bad_sigma_dist_is_usage_error(mini_shard, tmp_path):
    r = idx("train", "--data", mini_shard, "--out", str(tmp_path), "--steps", "1",
            "--sigma-dist", "log")
    assert r.returncode == 2 and "--sigma-dist" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "model.safetensors").exists()


def test_missing_data_is_one_line_error(tiny_checkpoint):
    r = idx("denoise-eval", "--data", "/nonexistent.tar", "--checkpoint", str(tiny_checkpoint))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "/nonexistent.tar" in lines[0] and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_missing_checkpoint_is_one_line_error(mini_shard, tmp_path):
    r = idx("denoise-eval", "--data", mini_shard, "--checkpoint", str(tmp_path / "no.safetensors"))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr


def test_denoise_eval_json(mini_shard, tiny_checkpoint):
    r = idx("denoise-eval", "--data", mini_shard, "--checkpoint", str(tiny_checkpoint), "--json",
            "--images", "32", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # exactly one JSON object: anything else makes this fail
    assert r.stdout.strip().count("\n") == 0
    assert out["checkpoint"].endswith(".safetensors")
    assert list(out["sigmas"]) == ["0.05", "0.1", "0.2", "0.4"]
    for row in out["sigmas"].values():
        assert set(row) >= {"noisy", "denoised", "baseline"}
        assert all(isinstance(v, float) for v in row.values())
    assert abs(out["sigmas"]["0.1"]["noisy"] - 20.0) < 0.5


def test_embed_writes_npz(mini_shard, tiny_checkpoint, tmp_path):
    out = tmp_path / "x.npz"
    r = idx("embed", "--data", mini_shard, "--out", str(out), "--checkpoint",
            str(tiny_checkpoint), "--workers", "0", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    z = np.load(out)
    assert len(z["keys"]) == 100 and len(set(z["keys"].tolist())) == 100
    assert sorted(np.bincount(z["labels"]).tolist()) == [10] * 10
    assert z["phi"].shape[0] == 100 and z["phi"].ndim == 2 and z["phi"].dtype == np.float32
    assert (z["phi"] >= 0).all() and np.isfinite(z["phi"]).all()
