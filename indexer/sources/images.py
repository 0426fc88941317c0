"""Decode any image the same way, whether it came from a shard, a folder or an upload:
EXIF orientation applied, converted to RGB, center-cropped to a square, area-resized to 64x64
(the preprocessing of shared/data/README.md). Bad input raises BadImage with a short reason.
"""

from __future__ import annotations

import io
import re
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SIZE = 64
MIN_SIDE = 16                    # below this an image carries too little to resize up from
MAX_PIXELS = 64_000_000          # larger images are refused (checked from the header, before
                                 # decoding; PIL's own global limit is left as it is)
MAX_BYTES = 64 * 1024 * 1024     # encoded size limit
DRAFT_MIN = 4 * SIZE             # JPEGs are DCT-downscaled no further than this (a side)
LARGE_PIXELS = 4_000_000         # images above this decode one or two at a time (memory)
LARGE_DECODES = threading.BoundedSemaphore(2)



class BadImage(ValueError):
    """An input that cannot become a 64x64 RGB image. `reason` is a short counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def too_many_pixels(n: int, size: str = "") -> str:
    return f"{size}{n:,} pixels, over the limit of {MAX_PIXELS:,} pixels"


def bomb_detail(e: Exception) -> str:
    """PIL's decompression-bomb message names PIL's own threshold (89 or 179 Mpx), not ours:
    say the image's size and our limit (MAX_PIXELS) instead."""
    m = re.search(r"\((\d+) pixels\)", str(e))
    return too_many_pixels(int(m.group(1))) if m else \
        f"over the limit of {MAX_PIXELS:,} pixels"


REDUCE_MIN = 4 * DRAFT_MIN       # large non-JPEG images are box-reduced to no less than this


def _reduce_factor(img: Image.Image) -> int:
    """An integer box-downscale keeping at least REDUCE_MIN px a side (1 for every image up to
    2048 px): memory for huge images, at no visible cost after the final area resize."""
    return max(1, min(img.size) // REDUCE_MIN)


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float images to 8-bit RGB, scaled (not clipped). The pixels are
    box-averaged down first, in float32, so an 8000x8000 16-bit PNG costs about its own size
    in memory rather than eight float64 copies of it."""
    f = _reduce_factor(img)
    w, h = img.size
    w, h = (w // f) * f, (h // f) * f
    a = np.empty((h // f, w // f), np.float32)
    step = max(1, 512 // f)   # output rows per strip: only a strip is ever copied out of PIL
    for r in range(0, h // f, step):
        r1 = min(h // f, r + step)
        strip = np.asarray(img.crop((0, r * f, w, r1 * f))).astype(np.float32)
        a[r:r1] = strip.reshape(r1 - r, f, w // f, f).mean(axis=(1, 3))
    if img.mode == "F":
        scale = 255.0 if float(a.max(initial=0.0)) <= 1.0 else 1.0
    else:
        hi = 65535.0 if img.mode.startswith("I;16") or float(a.max(initial=0.0)) > 255 else 255.0
        scale = 255.0 / hi
    a *= scale
    a += 0.5
    np.clip(a, 0, 255, out=a)
    return Image.fromarray(a.astype(np.uint8)).convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB. 16-bit and float images are scaled, not clipped. Large
    images are box-reduced first (an area average, as the final resize is)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _high_depth_to_rgb(img)
    f = _reduce_factor(img)
    if f > 1 and img.mode in ("L", "LA", "RGB", "RGBA", "RGBa", "La", "CMYK"):
        img = img.reduce(f)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparent pixels on white rather than on whatever colour they hide.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def from_pil(img: Image.Image, size: int = SIZE) -> np.ndarray:
    """A decoded PIL image to (size, size, 3) uint8."""
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise BadImage("too_large", too_many_pixels(w * h, f"{w}x{h} = "))
    if min(w, h) < MIN_SIDE:
        raise BadImage("too_small", f"{w}x{h}, need at least {MIN_SIDE} px a side")
    img = ImageOps.exif_transpose(img)
    img = _to_rgb(img)
    img = ImageOps.fit(img, (size, size), method=Image.Resampling.BOX, centering=(0.5, 0.5))
    return np.asarray(img, dtype=np.uint8).copy()


def decode(data: bytes, size: int = SIZE) -> np.ndarray:
    """Encoded bytes (JPEG, PNG, WebP, BMP, GIF first frame, TIFF, ...) to (size, size, 3) uint8."""
    if not data:
        raise BadImage("empty", "zero bytes")
    if len(data) > MAX_BYTES:
        raise BadImage("too_large", f"{len(data):,} bytes, over the limit of {MAX_BYTES:,} bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            img.seek(0)  # first frame of an animation
            # A camera JPEG decodes 4-8x faster scaled down in the DCT (an area average too);
            # at least DRAFT_MIN px a side are kept, so small images (every shard) are untouched.
            img.draft(None, (DRAFT_MIN, DRAFT_MIN))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImage("too_large", bomb_detail(e)) from None
        except UnidentifiedImageError:
            raise BadImage("not_an_image", "unrecognized format") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise BadImage("corrupt_image", str(e).splitlines()[0][:200]) from None
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise BadImage("too_large", too_many_pixels(w * h, f"{w}x{h} = "))
        if w * h <= LARGE_PIXELS:
            return _load_and_fit(img, size)
        with LARGE_DECODES:   # a few large decodes at a time bound a server's peak memory
            return _load_and_fit(img, size)


def _load_and_fit(img: Image.Image, size: int) -> np.ndarray:
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("too_large", bomb_detail(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage("corrupt_image", str(e).splitlines()[0][:200]) from None
    return from_pil(img, size)


def to_tensor_batch(images: np.ndarray):
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
