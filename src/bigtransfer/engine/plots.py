"""PNG charts drawn with Pillow alone: line plots, error-bar plots and confusion matrices."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..core.atomic import atomic_path

# Tableau-like colours that stay distinct for the first ten series.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
# Drawn at SCALE x the final size, then downsampled: Pillow's lines have no anti-aliasing of their own.
SCALE = 2
SIZE = (800, 500)

Point = tuple[float, float]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size * SCALE)
    except TypeError:  # Pillow without FreeType: a fixed bitmap font
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))

    def ticks_for(step: float) -> list[float]:
        first = math.ceil(lo / step - 1e-9)
        last = math.floor(hi / step + 1e-9)
        return [round(i * step, 12) for i in range(first, last + 1)]

    # The round step whose tick count is closest to `count` (the larger step on a tie).
    candidates = [m * mag for m in (1, 2, 2.5, 5, 10)]
    return min((ticks_for(step) for step in reversed(candidates)), key=lambda t: abs(len(t) - count))


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-")
    if float(v).is_integer():
        return str(int(v))
    return f"{v:.4g}"


class _Axes:
    """A plot area with linear or log axes that maps data to pixels and draws frame, ticks and labels."""

    def __init__(self, size: tuple[int, int], title: str, xlabel: str, ylabel: str,
                 xlim: tuple[float, float], ylim: tuple[float, float], log_x: bool = False, log_y: bool = False,
                 xticks: Sequence[float] | None = None) -> None:
        self.w, self.h = size[0] * SCALE, size[1] * SCALE
        self.img = Image.new("RGB", (self.w, self.h), "white")
        self.draw = ImageDraw.Draw(self.img)
        self.font, self.small = _font(15), _font(12)
        self.log_x, self.log_y = log_x, log_y
        self.left, self.right, self.top, self.bottom = 80 * SCALE, self.w - 30 * SCALE, 45 * SCALE, self.h - 60 * SCALE
        self.xlim = self._pad(xlim, log_x, 0.02)
        self.ylim = self._pad(ylim, log_y, 0.05)
        self._frame(title, xlabel, ylabel, xticks)

    @staticmethod
    def _pad(lim: tuple[float, float], log: bool, frac: float) -> tuple[float, float]:
        lo, hi = lim
        if log:
            lo, hi = math.log10(lo), math.log10(hi)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        span = hi - lo
        return lo - span * frac, hi + span * frac

    def px(self, x: float, y: float) -> tuple[float, float]:
        """Pixel position of a data point."""
        if self.log_x:
            x = math.log10(x)
        if self.log_y:
            y = math.log10(y)
        fx = (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0])
        fy = (y - self.ylim[0]) / (self.ylim[1] - self.ylim[0])
        return self.left + fx * (self.right - self.left), self.bottom - fy * (self.bottom - self.top)

    def _ticks(self, lim: tuple[float, float], log: bool) -> list[float]:
        if not log:
            return nice_ticks(*lim)
        lo, hi = lim
        decades = [10.0 ** e for e in range(math.floor(lo), math.ceil(hi) + 1) if lo <= e <= hi]
        if len(decades) >= 2:
            return decades
        # Less than a decade shown: round values placed on the log scale.
        return [t for t in nice_ticks(10 ** lo, 10 ** hi) if t > 0]

    def _frame(self, title: str, xlabel: str, ylabel: str, xticks: Sequence[float] | None) -> None:
        d, grid, s = self.draw, (225, 225, 225), SCALE
        d.text((self.w / 2, 12 * s), title, fill="black", font=self.font, anchor="mt")
        ys = self._ticks(self.ylim, self.log_y)
        for t in ys:
            _, y = self.px(1.0 if self.log_x else 0.0, t)
            d.line([(self.left, y), (self.right, y)], fill=grid, width=s)
            d.text((self.left - 6 * s, y), _fmt(t), fill="black", font=self.small, anchor="rm")
        xs = list(xticks) if xticks is not None else self._ticks(self.xlim, self.log_x)
        for t in xs:
            x, _ = self.px(t, 1.0 if self.log_y else 0.0)
            if not self.left - 1 <= x <= self.right + 1:
                continue
            d.line([(x, self.top), (x, self.bottom)], fill=grid, width=s)
            d.text((x, self.bottom + 6 * s), _fmt(t), fill="black", font=self.small, anchor="mt")
        d.rectangle([self.left, self.top, self.right, self.bottom], outline="black", width=s)
        d.text(((self.left + self.right) / 2, self.h - 10 * s), xlabel, fill="black", font=self.font, anchor="md")
        label = Image.new("RGB", (int(d.textlength(ylabel, font=self.font)) + 4 * s, 22 * s), "white")
        ImageDraw.Draw(label).text((2 * s, 11 * s), ylabel, fill="black", font=self.font, anchor="lm")
        rotated = label.rotate(90, expand=True)
        self.img.paste(rotated, (8 * s, int((self.top + self.bottom) / 2 - rotated.height / 2)))

    def legend(self, entries: Sequence[tuple[str, str]], points: Sequence[tuple[float, float]] = ()) -> None:
        """A box naming each colour, in whichever inner corner covers the fewest of `points` (pixels)."""
        if not entries:
            return
        d, s = self.draw, SCALE
        width = max(d.textlength(name, font=self.small) for name, _ in entries) + 40 * s
        height = len(entries) * 18 * s + 6 * s
        pad = 8 * s
        corners = [(self.right - width - pad, self.top + pad), (self.left + pad, self.top + pad),
                   (self.right - width - pad, self.bottom - height - pad), (self.left + pad, self.bottom - height - pad)]

        def covered(corner: tuple[float, float]) -> int:
            x0, y0 = corner
            return sum(x0 <= x <= x0 + width and y0 <= y <= y0 + height for x, y in points)

        x0, y0 = min(corners, key=covered)  # min keeps the first (upper right) on ties
        d.rectangle([x0, y0, x0 + width, y0 + height], fill="white", outline=(160, 160, 160))
        for i, (name, colour) in enumerate(entries):
            y = y0 + 12 * s + i * 18 * s
            d.line([(x0 + 6 * s, y), (x0 + 26 * s, y)], fill=colour, width=3 * s)
            d.text((x0 + 32 * s, y), name, fill="black", font=self.small, anchor="lm")

    def save(self, path: str | os.PathLike) -> Path:
        """Downsample to the final size and write the PNG atomically."""
        out = self.img.resize((self.w // SCALE, self.h // SCALE), Image.LANCZOS)
        p = Path(path)
        with atomic_path(p) as tmp:
            out.save(tmp, format="PNG")
        return p


def _finite(points: Sequence[Sequence[float]], log_x: bool, log_y: bool) -> list[tuple[float, ...]]:
    """Points that can be drawn: finite, and positive on a log axis."""
    out = []
    for p in points:
        vals = [float(v) for v in p]
        if not all(math.isfinite(v) for v in vals):
            continue
        if (log_x and vals[0] <= 0) or (log_y and any(v <= 0 for v in vals[1:])):
            continue
        out.append(tuple(vals))
    return out


def _densify(pix: Sequence[tuple[float, float]], per_segment: int = 8) -> list[tuple[float, float]]:
    """Pixel points along a polyline, so the legend can tell which corners a line crosses."""
    out = list(pix)
    for (x0, y0), (x1, y1) in zip(pix, pix[1:], strict=False):
        out += [(x0 + (x1 - x0) * t / per_segment, y0 + (y1 - y0) * t / per_segment) for t in range(1, per_segment)]
    return out


def _limits(values: list[float], fallback: tuple[float, float]) -> tuple[float, float]:
    return (min(values), max(values)) if values else fallback


def line_plot(path: str | os.PathLike, series: Mapping[str, Sequence[Point]], title: str, xlabel: str, ylabel: str,
              log_y: bool = False, log_x: bool = False, ylim: tuple[float, float] | None = None,
              size: tuple[int, int] = SIZE) -> Path:
    """Write a PNG with one line per named series of (x, y) points; `ylim` fixes the y range (e.g. 0-1)."""
    clean = {name: sorted(_finite(pts, log_x, log_y)) for name, pts in series.items()}
    xs = [p[0] for pts in clean.values() for p in pts]
    ys = [p[1] for pts in clean.values() for p in pts]
    fallback = (1.0, 10.0) if (log_x or log_y) else (0.0, 1.0)
    ax = _Axes(size, title, xlabel, ylabel, _limits(xs, fallback), ylim or _limits(ys, fallback), log_x, log_y)
    entries, drawn = [], []
    for i, (name, pts) in enumerate(clean.items()):
        colour = PALETTE[i % len(PALETTE)]
        entries.append((name, colour))
        pix = [ax.px(x, y) for x, y in pts]
        drawn += _densify(pix)
        if len(pix) > 1:
            ax.draw.line(pix, fill=colour, width=2 * SCALE, joint="curve")
        if len(pix) <= 40:  # short series (e.g. evaluations) get markers so single points show
            r = 3.5 * SCALE
            for x, y in pix:
                ax.draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    if len(clean) > 1:
        ax.legend(entries, drawn)
    return ax.save(path)


def error_bar_plot(path: str | os.PathLike, series: Mapping[str, Sequence[tuple[float, float, float, float]]],
                   title: str, xlabel: str, ylabel: str, log_x: bool = False, size: tuple[int, int] = SIZE) -> Path:
    """Write a PNG of (x, centre, low, high) points per series: a line through the centres, bars to low/high.

    Typical use: accuracy (median over seeds) against shots per class, with min/max as the bars.
    """
    clean = {name: sorted(_finite(pts, log_x, False)) for name, pts in series.items()}
    xs = sorted({p[0] for pts in clean.values() for p in pts})
    ys = [v for pts in clean.values() for p in pts for v in p[1:]]
    ax = _Axes(size, title, xlabel, ylabel, _limits(xs, (1.0, 10.0) if log_x else (0.0, 1.0)),
               _limits(ys, (0.0, 1.0)), log_x=log_x, xticks=xs if 0 < len(xs) <= 12 else None)
    entries, drawn = [], []
    for i, (name, pts) in enumerate(clean.items()):
        colour = PALETTE[i % len(PALETTE)]
        entries.append((name, colour))
        centres = [ax.px(x, c) for x, c, _, _ in pts]
        drawn += _densify(centres) + [ax.px(x, v) for x, _c, lo, hi in pts for v in (lo, hi)]
        if len(centres) > 1:
            ax.draw.line(centres, fill=colour, width=2 * SCALE)
        cap = 5 * SCALE
        for (x, _c, lo, hi), (px, py) in zip(pts, centres, strict=True):
            _, ylo = ax.px(x, lo)
            _, yhi = ax.px(x, hi)
            ax.draw.line([(px, ylo), (px, yhi)], fill=colour, width=2 * SCALE)
            ax.draw.line([(px - cap, ylo), (px + cap, ylo)], fill=colour, width=2 * SCALE)
            ax.draw.line([(px - cap, yhi), (px + cap, yhi)], fill=colour, width=2 * SCALE)
            r = 4 * SCALE
            ax.draw.ellipse([px - r, py - r, px + r, py + r], fill=colour)
    if len(clean) > 1:
        ax.legend(entries, drawn)
    return ax.save(path)


def _shade(fraction: float) -> tuple[int, int, int]:
    """White (0) to dark blue (1)."""
    f = min(max(fraction, 0.0), 1.0)
    lo, hi = np.array([255, 255, 255]), np.array([8, 48, 107])
    return tuple(int(round(v)) for v in lo + (hi - lo) * f)


def confusion_plot(path: str | os.PathLike, matrix: Sequence[Sequence[int]] | np.ndarray, classes: Sequence[str],
                   title: str = "Confusion matrix (rows: true class, columns: predicted)") -> Path:
    """Write a PNG of a confusion matrix: cells shaded by the row's fraction, counts printed when they fit."""
    m = np.asarray(matrix, dtype=np.int64)
    n = m.shape[0]
    if m.shape != (n, n) or len(classes) != n:
        raise ValueError(f"confusion matrix of shape {m.shape} does not match {len(classes)} class names")
    s = SCALE
    cell = max(4, min(48, 640 // max(n, 1))) * s
    show_names = n <= 60
    font, small = _font(15), _font(max(7, min(12, cell // s - 4)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    names = [c if len(c) <= 16 else c[:15] + "…" for c in map(str, classes)]
    label_w = int(max((probe.textlength(c, font=small) for c in names), default=0)) + 12 * s if show_names else 10 * s
    left, top = label_w + 34 * s, 50 * s
    width = left + n * cell + 20 * s
    height = top + n * cell + label_w + 40 * s
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((width / 2, 14 * s), title, fill="black", font=font, anchor="mt")
    rows = m.sum(axis=1)
    for i in range(n):
        for j in range(n):
            frac = m[i, j] / rows[i] if rows[i] else 0.0
            x0, y0 = left + j * cell, top + i * cell
            d.rectangle([x0, y0, x0 + cell, y0 + cell], fill=_shade(frac), outline=(210, 210, 210))
            if cell >= 18 * s and m[i, j]:
                d.text((x0 + cell / 2, y0 + cell / 2), str(int(m[i, j])), font=small, anchor="mm",
                       fill="white" if frac > 0.5 else "black")
    d.rectangle([left, top, left + n * cell, top + n * cell], outline="black", width=s)
    if show_names:
        for i, name in enumerate(names):
            d.text((left - 6 * s, top + i * cell + cell / 2), name, fill="black", font=small, anchor="rm")
            tile = Image.new("RGB", (int(probe.textlength(name, font=small)) + 4 * s, cell), "white")
            ImageDraw.Draw(tile).text((2 * s, cell / 2), name, fill="black", font=small, anchor="lm")
            rotated = tile.rotate(90, expand=True)
            img.paste(rotated, (left + i * cell, top + n * cell + 6 * s))
    d.text((left + n * cell / 2, height - 8 * s), "predicted", fill="black", font=font, anchor="md")
    true_label = Image.new("RGB", (int(probe.textlength("true", font=font)) + 4 * s, 22 * s), "white")
    ImageDraw.Draw(true_label).text((2 * s, 11 * s), "true", fill="black", font=font, anchor="lm")
    rotated = true_label.rotate(90, expand=True)
    img.paste(rotated, (6 * s, int(top + n * cell / 2 - rotated.height / 2)))
    out = img.resize((width // s, height // s), Image.LANCZOS)
    p = Path(path)
    with atomic_path(p) as tmp:
        out.save(tmp, format="PNG")
    return p
