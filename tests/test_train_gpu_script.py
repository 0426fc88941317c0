"""scripts/train-gpu.sh, the script a lent GPU runs, exercised on the CPU with the tiny preset:
it trains from device-resident data, writes the weights as parts under the size limit, and the
parts join back into the same checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from phisearch.indexer.model import checkpoint as ckpt
from phisearch.indexer.model.parts import join, split

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow   # PHISEARCH_SLOW=1 and CI run it
def test_gpu_script_runs_on_the_cpu_and_its_parts_join_back(tmp_path, data_dir):
    out, run = tmp_path / "out", tmp_path / "run"
    env = dict(os.environ, PRESET="tiny", STEPS="3", DEVICE="cpu", BATCH="8", OUT=str(out),
               RUN=str(run), PHISEARCH_DATA=str(data_dir.parent), PHISEARCH_NO_PROGRESS="1",
               SAVE_EVERY="0.1")
    r = subprocess.run(["bash", str(REPO / "scripts" / "train-gpu.sh")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    parts = sorted(out.glob("model.part*.safetensors"))
    assert parts and all(p.stat().st_size < 16 * 2**20 for p in parts)
    assert (out / "train.log").is_file() and (out / "model.json").is_file()
    joined = join(parts, tmp_path / "joined.safetensors")
    c, full = ckpt.load(joined), ckpt.load(run / "model.safetensors")
    assert c.info["steps"] == 3 and c.info["train"]["resident"] is True
    for (k, a), b in zip(c.model.state_dict().items(), full.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3, msg=k)   # fp16 parts


def test_split_into_many_parts_and_refuse_a_missing_one(tmp_path, tiny_ckpt):
    parts = split(tiny_ckpt, tmp_path / "p", max_mb=0.08)
    assert len(parts) >= 2
    joined = join(list(reversed(parts)), tmp_path / "j.safetensors")
    assert ckpt.load(joined).sha256 == json.loads((tmp_path / "p" / "tiny.json").read_text())[
        "weights_sha256"]
    with pytest.raises(ValueError, match="missing"):
        join(parts[1:], tmp_path / "k.safetensors")
