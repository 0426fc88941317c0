"""Shards with known defects, written on the fly from the real mini shard (nothing committed)."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

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
