"""Random views of a shape: background, scale, position, aspect, rotation and colour drawn from a generator."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from ..core.errors import UserError


@dataclass
class Shape:
    """A cut-out to draw: RGBA cropped to its ink, whether it is a mask to recolour, and its style label."""

    image: Image.Image  # RGBA, cropped to the non-transparent box
    recolour: bool  # monochrome shapes (glyphs, symbolic icons) take a random colour in every view
    style: str | None = None  # the font family or icon theme it was drawn from (a per-view label)


def crop_to_ink(img: Image.Image) -> Image.Image | None:
    """An RGBA image cropped to its visible pixels, or None when nothing is visible."""
    rgba = img.convert("RGBA")
    box = rgba.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
    return rgba.crop(box) if box else None


def as_mask(img: Image.Image) -> Image.Image:
    """A monochrome cut-out as white with its coverage in alpha (dark ink on transparent becomes the alpha)."""
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 0))
    white.putalpha(rgba.getchannel("A"))
    return white


def is_monochrome(img: Image.Image, tolerance: float = 10.0) -> bool:
    """True when every visible pixel has (nearly) the same colour, so recolouring loses nothing."""
    a = np.asarray(img.convert("RGBA"), dtype=np.float32)
    visible = a[..., 3] > 128
    if not visible.any():
        return True
    rgb = a[..., :3][visible]
    return bool(np.abs(rgb - rgb.mean(axis=0)).mean() < tolerance)


def signature(shape: Shape, side: int = 24) -> np.ndarray:
    """A small picture of the shape, centred in a square on grey: near-equal shapes have near-equal signatures."""
    img = as_mask(shape.image) if shape.recolour else shape.image
    w, h = img.size
    scale = side / max(w, h)
    small = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    canvas = Image.new("RGBA", (side, side), (128, 128, 128, 255))
    if shape.recolour:
        canvas = Image.new("RGBA", (side, side), (0, 0, 0, 255))
    canvas.alpha_composite(small, ((side - small.width) // 2, (side - small.height) // 2))
    return np.asarray(canvas.convert("RGB"), dtype=np.float32).ravel() / 255.0


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))  # type: ignore[return-value]


def _luma(c) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def background(size: int, rng: np.random.Generator) -> Image.Image:
    """A random backdrop: flat colour, gradient, smooth noise, or clutter of faint shapes."""
    kind = rng.choice(4, p=[0.25, 0.3, 0.25, 0.2])
    if kind == 0:  # half of the flat backdrops grey, as icons and text are most often shown
        return Image.new("RGB", (size, size), _colour(rng) if rng.random() < 0.5 else (int(rng.integers(256)),) * 3)
    if kind in (1, 3):
        a, b = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
        theta = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1)
        t = (np.cos(theta) * xx + np.sin(theta) * yy)
        t = (t - t.min()) / max(1e-6, np.ptp(t))
        img = Image.fromarray((a + (b - a) * t[..., None]).astype(np.uint8), "RGB")
        if kind == 1:
            return img
        draw = ImageDraw.Draw(img, "RGBA")
        for _ in range(int(rng.integers(2, 7))):
            x0, y0 = rng.integers(-size // 4, size, 2)
            w, h = rng.integers(size // 8, size // 2, 2)
            fill = (*_colour(rng), int(rng.integers(40, 140)))
            if rng.random() < 0.5:
                draw.ellipse((x0, y0, x0 + w, y0 + h), fill=fill)
            elif rng.random() < 0.5:
                draw.rectangle((x0, y0, x0 + w, y0 + h), fill=fill)
            else:
                draw.line((x0, y0, x0 + w, y0 + h), fill=fill, width=int(rng.integers(1, 4)))
        return img
    cells = int(rng.integers(2, 9))
    noise = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    return Image.fromarray(noise, "RGB").resize((size, size), Image.BICUBIC)


def render_view(shape: Shape, size: int, rng: np.random.Generator, max_rotation: float = 20.0) -> Image.Image:
    """One size x size RGB view of a shape, every choice drawn from rng."""
    bg = background(size, rng)
    fg = shape.image
    w, h = fg.size
    side = rng.uniform(0.45, 0.95) * size
    aspect = float(np.exp(rng.uniform(-0.15, 0.15)))
    scale = side / max(w, h)
    fg = fg.resize((max(1, round(w * scale * aspect)), max(1, round(h * scale / aspect))), Image.BICUBIC)
    if shape.recolour:
        # Ink that stands out from the backdrop: at least 80 grey levels of luminance apart.
        mean = _luma(np.asarray(bg, dtype=np.float32).reshape(-1, 3).mean(axis=0))
        for _ in range(20):
            ink = _colour(rng)
            if abs(_luma(ink) - mean) >= 80:
                break
        else:
            ink = (0, 0, 0) if mean > 127 else (255, 255, 255)
        alpha = fg.getchannel("A")
        fg = Image.new("RGBA", fg.size, (*ink, 255))
        fg.putalpha(alpha)
    else:
        rgb = fg.convert("RGB")
        for enhancer, lo, hi in ((ImageEnhance.Brightness, 0.75, 1.2), (ImageEnhance.Contrast, 0.75, 1.25),
                                 (ImageEnhance.Color, 0.6, 1.3)):
            rgb = enhancer(rgb).enhance(float(rng.uniform(lo, hi)))
        rgb.putalpha(fg.getchannel("A"))
        fg = rgb
    fg = fg.rotate(float(rng.uniform(-max_rotation, max_rotation)), Image.BICUBIC, expand=True)
    if max(fg.size) > size:
        k = size / max(fg.size)
        fg = fg.resize((max(1, int(fg.width * k)), max(1, int(fg.height * k))), Image.BICUBIC)
    x, y = (int(v) for v in rng.integers(0, [size - fg.width + 1, size - fg.height + 1]))
    canvas = bg.convert("RGBA")
    if rng.random() < 0.15:  # a soft drop shadow, as icons are often shown
        shadow = Image.new("RGBA", fg.size, (0, 0, 0, 0))
        shadow.putalpha(fg.getchannel("A").point(lambda a: a // 2))
        shadow = shadow.filter(ImageFilter.GaussianBlur(1.5))
        dx, dy = (int(v) for v in rng.integers(1, 4, 2))
        canvas.alpha_composite(shadow, (min(size - fg.width, x + dx), min(size - fg.height, y + dy)))
    canvas.alpha_composite(fg, (x, y))
    out = canvas.convert("RGB")
    if rng.random() < 0.1:
        out = out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.0))))
    if rng.random() < 0.1:
        noisy = np.asarray(out, dtype=np.float32) + rng.normal(0, rng.uniform(3, 12), (size, size, 3))
        out = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
    return out


def encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    """PNG or JPEG bytes of an RGB image."""
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG", optimize=False, compress_level=6)
    elif fmt in ("jpg", "jpeg"):
        img.save(buf, "JPEG", quality=quality)
    else:
        raise UserError(f"image format must be png or jpg, not {fmt!r}")
    return buf.getvalue()
