"""Shards with known defects, written on the fly from the real mini shard (nothing committed),
and a shard that stops where a test wants it to (Gate)."""

from __future__ import annotations

import errno
import io
import os
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path
from typing import Self

import numpy as np
from PIL import Image


def read_samples(shard: str | Path, n: int) -> list[tuple[str, dict[str, bytes]]]:
    """The first n samples of a shard as (key, {ext: bytes}), in order."""
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(shard) as tf:
        for m in tf:
            key, ext = m.name.split(".", 1)
            if not out or out[-1][0] != key:
                if len(out) == n:
                    break
                out.append((key, {}))
            out[-1][1][ext] = tf.extractfile(m).read()
    return out


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    info.mode = 0o644
    tf.addfile(info, io.BytesIO(data))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(side: int = 20000) -> bytes:
    """A PNG whose header declares side x side 8-bit gray pixels: a few hundred bytes on disk.
    PIL refuses it at open time (more than twice Image.MAX_IMAGE_PIXELS)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (side + 1))  # one row; the rest is missing, never read
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def _gradient(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth colour image with some texture: (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1),
                    (xx + yy) * 127 / max(w + h - 2, 1)], -1)
    return np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)


def write_bad_shard(path: Path, good_from: str, n_good: int = 6) -> dict[str, int]:
    """A WebDataset tar mixing n_good real samples with one of each kind of bad (and odd but good)
    input. Returns the expected counts: {"good": N, reason: count, ...}, with the reasons that
    indexer/sources/images.py (BadImage.reason) and indexer/sources/records.py (Skip.reason) use."""
    good = read_samples(good_from, n_good)
    real_jpg = good[0][1]["jpg"]
    rgb = Image.fromarray(_gradient(64, 64))
    gray16 = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    odd_good: list[tuple[str, str, bytes]] = [
        ("odd_gray", "png", _encode(rgb.convert("L"), "PNG")),
        ("odd_rgba", "png", _encode(rgb.convert("RGBA"), "PNG")),
        ("odd_cmyk", "jpg", _encode(rgb.convert("CMYK"), "JPEG", quality=95)),
        ("odd_gray16", "png", _encode(Image.fromarray(gray16), "PNG")),
        ("odd_wide", "png", _encode(Image.fromarray(_gradient(100, 60, 1)), "PNG")),
    ]
    # SOI + APP0 marker, then garbage: recognized as a JPEG, fails to decode.
    corrupt = real_jpg[:4] + bytes(np.random.default_rng(0).integers(0, 256, 2000, np.uint8))
    bad: list[tuple[str, str | None, bytes, str]] = [
        ("bad_corrupt", "jpg", corrupt, "corrupt_image"),
        ("bad_truncated", "jpg", real_jpg[: len(real_jpg) // 2], "corrupt_image"),
        ("bad_clsonly", None, b"3", "no_image"),
        ("bad_text", "jpg", b"this is not an image, just some text\n" * 4, "not_an_image"),
        ("bad_tiny", "png", _encode(Image.fromarray(_gradient(10, 10)), "PNG"), "too_small"),
        ("bad_bomb", "png", bomb_png(), "too_large"),
        ("bad_empty", "jpg", b"", "empty"),
    ]
    expected: dict[str, int] = {"good": n_good + len(odd_good)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        items: list[tuple[str, dict[str, bytes]]] = list(good)
        items += [(k, {ext: data, "cls": b"0"}) for k, ext, data in odd_good]
        for k, ext, data, reason in bad:
            items.append((k, {ext: data, "cls": b"0"} if ext else {"cls": data}))
            expected[reason] = expected.get(reason, 0) + 1
        # interleave good and bad so that a bad sample never ends the stream of good ones
        order = [items[i] for i in np.random.default_rng(1).permutation(len(items))]
        for key, parts in order:
            for ext, data in parts.items():
                _add(tf, f"{key}.{ext}", data)
    return expected


def write_truncated_tar(path: Path, good_from: str, n: int) -> int:
    """n real samples, then the file cut in the middle of the last sample's image member.
    Returns how many complete samples precede the cut (n - 1)."""
    samples = read_samples(good_from, n)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        offsets = []
        for key, parts in samples:
            offsets.append(tf.offset)
            for ext, data in parts.items():
                _add(tf, f"{key}.{ext}", data)
    # the last sample starts at offsets[-1]: a 512-byte header, then its first member's data
    cut = offsets[-1] + 512 + len(next(iter(samples[-1][1].values()))) // 2
    with open(path, "r+b") as f:
        f.truncate(cut)
    return n - 1


# ------------------------------------------------------------------ a shard that waits

GATE_SCRIPT = '''\
"""Writes the shard argv[3] up to byte argv[2], waits until its reader has taken all of it,
opens the FIFO argv[1] (blocks until the test opens it), reads it to EOF (the test closes it),
then writes the rest. Leaves quietly when its reader is gone."""
import array, fcntl, os, select, sys, termios, time
gate, offset, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
data = open(path, "rb").read()
out = sys.stdout.buffer
try:
    out.write(data[:offset])
    out.flush()
    poll, left = select.poll(), array.array("i", [1])
    poll.register(1, select.POLLOUT)
    while left[0]:
        fcntl.ioctl(1, termios.FIONREAD, left)
        if any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poll.poll(0)):
            os._exit(0)
        time.sleep(0.005)
    with open(gate, "rb") as g:
        g.read()
    out.write(data[offset:])
    out.flush()
except BrokenPipeError:
    os._exit(0)
'''


class Gate:
    """A `pipe:` shard that stops at a byte offset until the test lets it go: a test waits for
    that state (wait) instead of for a time. The stop is a FIFO; release() ends it and replaces
    it by an empty file, so later reads of the same url (a resume) never stop."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "gate"
        self.script = folder / "gate_shard.py"
        self.script.write_text(GATE_SCRIPT)
        os.mkfifo(self.path)
        self.fd: int | None = None

    def url(self, shard: str | Path, offset: int = 0) -> str:
        """The pipe url: `shard` up to `offset` bytes, the stop, the rest. The shard's path comes
        last, so its folder's manifest names the dataset (sources.shards.folder_info)."""
        return f"pipe:{sys.executable} {self.script} {self.path} {offset} {shard}"

    def reached(self) -> bool:
        """True once the shard's reader has taken every byte before the stop and waits at it
        (a FIFO opens for writing without blocking only when its reader is there)."""
        if self.fd is None:
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
        return self.fd is not None

    def wait(self, proc: subprocess.Popen | None = None, timeout: float = 120) -> bool:
        """Block until reached() (False if `proc` exits first or `timeout`, a failure bound)."""
        deadline = time.monotonic() + timeout
        while not self.reached():
            if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def release(self) -> None:
        """Let the shard go on, now and for every later read."""
        if self.path.is_fifo():
            self.reached()      # a reader blocked in open() is let through too
            empty = self.path.with_name("gate.empty")
            empty.touch()
            os.replace(empty, self.path)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def sample_offset(shard: str | Path, n: int) -> int:
    """The byte offset at which sample n (0-based) of a shard starts."""
    with tarfile.open(shard) as tf:
        seen: list[str] = []
        for m in tf:
            key = m.name.split(".", 1)[0]
            if key not in seen:
                if len(seen) == n:
                    return m.offset
                seen.append(key)
    raise ValueError(f"{shard} holds {len(seen)} samples, not {n + 1}")
