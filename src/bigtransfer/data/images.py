"""Decode image files to RGB and turn them into model input; every failure names the file."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from ..core.errors import UserError

# Suffixes treated as images when scanning folders (anything else is ignored and counted).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
# The most pixels an image may have: a larger one is named and skipped like any unreadable image, from its header
# alone, before anything is decoded. 100 million pixels decode to 300 MB of RGB (a 20000 x 20000 PNG of 1 MB on
# disk would take 1.2 GB); BiT trains at up to 512 px. Pillow's own check is set to the same number, so it raises
# for anything over twice that while opening the header (and warns between 1x and 2x, where this check refuses).
MAX_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(UserError):
    """An image that cannot be decoded; str() gives the path and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def is_image_path(path: str | os.PathLike) -> bool:
    """True for a visible file whose suffix is an image format."""
    p = Path(path)
    return not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (grey, palette, RGBA, CMYK, 16-bit, float) as 8-bit RGB; alpha composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / hi * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def open_rgb(path: str | os.PathLike | None = None, data: bytes | None = None) -> Image.Image:
    """Decode an image file (or bytes) fully to RGB, or raise ImageError naming the file and reason."""
    name = str(path) if path is not None else "<bytes>"
    try:
        if data is None:
            if path is None:
                raise ValueError("open_rgb needs a path or bytes")
            if os.path.getsize(path) == 0:
                raise ImageError(name, "empty file")
            src = Image.open(path)
        else:
            if len(data) == 0:
                raise ImageError(name, "empty file")
            src = Image.open(io.BytesIO(data))
        with src as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(name, _too_large(f"{img.width}x{img.height} = {img.width * img.height:,} pixels"))
            img.load()  # decode now, so truncation is found here and not inside a worker later
            rgb = to_rgb(img)
            rgb.load()
            return rgb
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(name, "no such file") from None
    except UnidentifiedImageError:
        raise ImageError(name, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:  # Pillow's own check, at twice MAX_PIXELS, while reading the header
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        raise ImageError(name, _too_large(f"{int(pixels[1]):,} pixels" if pixels else str(e))) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(name, f"cannot decode ({e})") from None


def _too_large(size: str) -> str:
    return f"too large to decode ({size}; the limit is bigtransfer.data.images.MAX_PIXELS = {MAX_PIXELS:,} pixels)"


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image to a float CHW tensor with pixels scaled to [-1, 1]."""
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return a.float().div_(127.5).sub_(1.0)


def squash(img: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Resize to (size, size) or (h, w) ignoring the aspect ratio, as BiT does."""
    h, w = (size, size) if isinstance(size, int) else size
    return img if img.size == (w, h) else img.resize((w, h), Image.BILINEAR)


def load_for_eval(path: str | os.PathLike, size: int) -> torch.Tensor:
    """The evaluation view of an image file: squash-resized to size x size, in [-1, 1]."""
    return to_tensor(squash(open_rgb(path), size))
