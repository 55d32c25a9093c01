"""A small image task that is not digits: filled shapes (circle, square, triangle, cross) of random size, position,
rotation and colour on random two-colour gradient backdrops, written as a class-per-folder PNG dataset."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        corners = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
        r = r / math.sqrt(2)
    elif kind == "triangle":
        corners = [(math.cos(a), math.sin(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    else:  # cross: a plus sign of arm width r/2
        w = 0.3
        corners = [(w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w), (-w, -1), (w, -1), (w, -w), (1, -w),
                   (1, w), (w, w)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in corners]


def shape_image(kind: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One random picture of `kind`."""
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, size)[:, None, None]
    backdrop = (a * (1 - t) + b * t).repeat(size, axis=1).astype(np.uint8)
    img = Image.fromarray(backdrop)
    ink = tuple(int(v) for v in (255 - (a + b) // 2 + rng.integers(-60, 61, 3)).clip(0, 255))
    r = size * rng.uniform(0.18, 0.38)
    cx, cy = rng.uniform(r, size - r, 2)
    draw = ImageDraw.Draw(img)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=ink)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=ink)
    return img


def write_shapes(root: str | Path, per_class: int, test_per_class: int, seed: int = 0) -> Path:
    """root/train/<shape>/*.png and root/test/<shape>/*.png."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for kind in SHAPES:
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape_image(kind, rng).save(folder / f"{i:03d}.png")
    return root
