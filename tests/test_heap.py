"""The heap settings (indexer/model/heap.py) remove the page faults of a training step: counted
by the kernel (ru_minflt) in a fresh process each way, never timed."""

from __future__ import annotations

import subprocess
import sys

import pytest

STEPS = """
import resource, sys, torch
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    from phisearch.indexer.model.heap import keep_freed_memory
    assert keep_freed_memory()
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(),
                        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(),
                        torch.nn.Conv2d(64, 3, 3, padding=1))
opt = torch.optim.Adam(m.parameters())
x = torch.randn(32, 3, 64, 64)
def step():
    loss = (m(x) - x).pow(2).mean(); opt.zero_grad(); loss.backward(); opt.step()
for _ in range(3):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 5)
"""


def faults_per_step(mode: str) -> float:
    r = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True,
                       check=False, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return float(r.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_heap_removes_most_page_faults_of_a_training_step():
    default, kept = faults_per_step("default"), faults_per_step("keep")
    # ~158,000 vs 2,500-7,400 here: each step's 32 MiB activations were unmapped and faulted back
    assert kept * 10 < default, (default, kept)
