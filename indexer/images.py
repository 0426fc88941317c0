"""Decode any image the same way, whether it came from a shard, a folder or an upload:
EXIF orientation applied, converted to RGB, center-cropped to a square, area-resized to 64x64
(the preprocessing of shared/data/README.md). Bad input raises BadImage with a short reason.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SIZE = 64
MIN_SIDE = 16                    # below this an image carries too little to resize up from
MAX_PIXELS = 64_000_000          # larger images are refused as decompression bombs
MAX_BYTES = 64 * 1024 * 1024     # encoded size limit
DRAFT_MIN = 4 * SIZE             # JPEGs are DCT-downscaled no further than this (a side)

Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class BadImage(ValueError):
    """An input that cannot become a 64x64 RGB image. `reason` is a short counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB. 16-bit and float images are scaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        return Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        scale = 255.0 if a.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(a * scale + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
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
        raise BadImage("too_large", f"{w}x{h} pixels")
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
        raise BadImage("too_large", f"{len(data)} bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            img.seek(0)  # first frame of an animation
            # A camera JPEG decodes 4-8x faster scaled down in the DCT (an area average too);
            # at least DRAFT_MIN px a side are kept, so small images (every shard) are untouched.
            img.draft(None, (DRAFT_MIN, DRAFT_MIN))
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImage("too_large", str(e)) from None
        except UnidentifiedImageError:
            raise BadImage("not_an_image", "unrecognized format") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise BadImage("corrupt_image", str(e).splitlines()[0][:200]) from None
        return from_pil(img, size)


def to_tensor_batch(images: np.ndarray):
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
