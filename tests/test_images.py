"""Decoding hostile images: memory per decode of a huge 16-bit PNG, and a bound on how many
large decodes run at once (a server decoding uploads in a thread pool)."""

from __future__ import annotations

import io
import subprocess
import sys
import threading

import numpy as np
import pytest
from phisearch.indexer.sources import images
from PIL import Image

MEASURE = """
import resource, sys
from phisearch.indexer.sources import images
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = images.decode(data)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) // 1024, out.shape[0], out.shape[1], float(out.mean()))
"""


@pytest.fixture(scope="module")
def png16(tmp_path_factory) -> tuple[str, np.ndarray]:
    """An 8000x8000 16-bit gray PNG (a few hundred kB on disk, 122 MB as pixels), and what its
    64x64 center crop should look like (block means of the 16-bit values, scaled to 8 bits)."""
    side = 8000
    a = np.add.outer(np.arange(side, dtype=np.uint32), np.arange(side, dtype=np.uint32))
    a = (a * 4).astype(np.uint16)
    path = tmp_path_factory.mktemp("png16") / "big16.png"
    Image.fromarray(a).save(path, format="PNG")
    f = side // 64
    want = a.reshape(64, f, 64, f).mean(axis=(1, 3)) / 65535 * 255
    return str(path), want


def test_huge_16bit_png_decodes_in_bounded_memory(png16):
    path, want = png16
    r = subprocess.run([sys.executable, "-c", MEASURE, path], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    peak_mb, h, w, mean = r.stdout.split()
    # 122 MB of 16-bit pixels: PIL's own copy plus strips. It was 1.7 GB with float64 copies.
    assert int(peak_mb) < 450, f"peak memory increase {peak_mb} MB"
    assert (int(h), int(w)) == (64, 64)
    assert abs(float(mean) - want.mean()) < 1.5   # scaled, not clipped: the mean survives


def test_large_decodes_run_at_most_two_at_a_time(monkeypatch):
    """Six threads decode a large image at once; the bound lets two in at a time."""
    rgb = np.random.default_rng(0).integers(0, 256, (2100, 2100, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    data = buf.getvalue()
    inside, most = [0], [0]
    cond = threading.Condition()
    go = threading.Event()
    real = images._load_and_fit

    def counting(img, size):
        with cond:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            cond.notify_all()
        go.wait(120)      # the first in stay until the test has seen both slots taken
        try:
            return real(img, size)
        finally:
            with cond:
                inside[0] -= 1

    monkeypatch.setattr(images, "_load_and_fit", counting)
    threads = [threading.Thread(target=images.decode, args=(data,)) for _ in range(6)]
    for t in threads:
        t.start()
    with cond:   # two inside, and held there: the other four wait for a slot (120 s: a failure)
        assert cond.wait_for(lambda: inside[0] == 2, timeout=120), inside
    third = images.LARGE_DECODES.acquire(blocking=False)
    if third:
        images.LARGE_DECODES.release()
    held = inside[0]
    go.set()
    assert not third and held == 2   # both slots taken, no one else inside
    for t in threads:
        t.join()
    assert most[0] == 2


def test_small_images_are_not_queued_behind_large_ones():
    """The bound is for large images only: with both slots taken, a 64x64 decode still runs."""
    small = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(small, format="PNG")
    assert images.LARGE_DECODES.acquire(timeout=1) and images.LARGE_DECODES.acquire(timeout=1)
    try:
        assert images.decode(small.getvalue()).shape == (64, 64, 3)
    finally:
        images.LARGE_DECODES.release()
        images.LARGE_DECODES.release()
