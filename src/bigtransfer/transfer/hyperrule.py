"""BiT-HyperRule: resolution, schedule, learning rate and MixUp for a transfer run, from the dataset alone.

Two variants (spec section 3):

- ``"release"`` (default): the authors' released code, value for value. Schedule by training-set size:
  < 20k examples -> [warmup 100, decays 200, 300, 400, end 500]; < 500k -> [500, 3000, 6000, 9000, 10000];
  else [500, 6000, 12000, 18000, 20000]. lr(s) = base * s / warmup while s < warmup (the first update has
  lr 0), then base / 10 ** (number of decay boundaries strictly below s); training stops at ``end`` updates.
  Resolution: image area < 96*96 -> squash to 160, crop 128; else 512 / 480.
- ``"paper"``: what the paper states. End 500 / 10k / 20k by the same thresholds, x0.1 at 30%, 60% and 90% of the
  end (same "strictly below s" convention), no warmup; resolution 448 / 384 (512 / 480 for R152x4), small 160 / 128.

Batch sizes other than 512 (linear scaling): the lr is multiplied by B / 512 and every step count (warmup,
boundaries, end) by 512 / B, so the same number of images is seen. ``steps=S`` instead sets the end to exactly S
updates at batch B and moves warmup and boundaries proportionally (x S / end). Scaled step counts are rounded half
up, then nudged so that warmup >= 1 (release; the paper's warmup stays 0) and warmup < d1 < d2 < d3 < end whenever
the end leaves room for that; a very short run gets tied (empty) phases instead.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from ..core.errors import UserError
from ..core.validate import check_positive
from ..engine.schedule import idle_warning, piecewise_lr

Variant = Literal["release", "paper"]
VARIANTS: tuple[str, ...] = ("release", "paper")

REFERENCE_BATCH = 512
BASE_LR = 0.003
SMALL_AREA = 96 * 96  # images with fewer pixels than this train at 128 px
MIXUP_THRESHOLD = 20_000
LARGE_THRESHOLD = 500_000

# Phase points [warmup, d1, d2, d3, end] of the release, by dataset size class.
_RELEASE = {"small": (100, 200, 300, 400, 500), "medium": (500, 3000, 6000, 9000, 10_000),
            "large": (500, 6000, 12_000, 18_000, 20_000)}
_PAPER_END = {"small": 500, "medium": 10_000, "large": 20_000}
_PAPER_DECAYS = (0.3, 0.6, 0.9)
_ARCH_IN_NAME = re.compile(r"R(\d+)x(\d+(?:\.\d+)?)", re.IGNORECASE)


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise UserError(f"unknown HyperRule variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def _size_class(n_examples: int) -> str:
    check_positive("n_examples", n_examples)
    if n_examples < MIXUP_THRESHOLD:
        return "small"
    return "medium" if n_examples < LARGE_THRESHOLD else "large"


def _is_r152x4(arch: str | None) -> bool:
    m = _ARCH_IN_NAME.search(arch or "")
    return bool(m) and int(m.group(1)) == 152 and float(m.group(2)) == 4.0


def resolution(image_size: tuple[int, int], variant: Variant = "release", arch: str | None = None) -> tuple[int, int]:
    """(precrop, crop) for images of size (h, w): squash-resize to precrop, then crop to crop."""
    _check_variant(variant)
    h, w = image_size
    if h < 1 or w < 1:
        raise UserError(f"image size must be positive, got {h}x{w}")
    if h * w < SMALL_AREA:
        return (160, 128)
    if variant == "paper" and not _is_r152x4(arch):
        return (448, 384)
    return (512, 480)


def mixup_alpha(n_examples: int) -> float:
    """MixUp's Beta(alpha, alpha) parameter: 0 (off) below 20k training examples, else 0.1."""
    return 0.0 if _size_class(n_examples) == "small" else 0.1


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _fit(points: tuple[float, ...], end: int, first_min: int) -> list[int]:
    """Round [warmup, d1, d2, d3] and make them strictly increasing below end where there is room."""
    pts = [max(first_min, _round_half_up(p)) if i == 0 else _round_half_up(p) for i, p in enumerate(points)]
    for i in range(1, len(pts)):
        pts[i] = max(pts[i], pts[i - 1] + 1)
    upper = end - 1
    for i in reversed(range(len(pts))):
        pts[i] = min(pts[i], upper)
        upper = pts[i] - 1
    # No room for strict order: clamp into [first_min, end] and accept ties (empty phases).
    lowest = first_min
    for i in range(len(pts)):
        pts[i] = min(max(pts[i], lowest), end)
        lowest = pts[i]
    return pts


def schedule(n_examples: int, variant: Variant = "release", batch: int = REFERENCE_BATCH,
             steps: int | None = None) -> list[int]:
    """Phase points [warmup, d1, d2, d3, end] in updates of size `batch` (see the module docstring)."""
    _check_variant(variant)
    check_positive("batch", batch)
    size = _size_class(n_examples)
    if variant == "release":
        base = tuple(float(p) for p in _RELEASE[size])
    else:
        end = _PAPER_END[size]
        base = (0.0, *(f * end for f in _PAPER_DECAYS), float(end))
    if steps is not None:
        check_positive("steps", steps)
        end, scale = steps, steps / base[-1]
    else:
        scale = REFERENCE_BATCH / batch
        end = max(1, _round_half_up(base[-1] * scale))
    first_min = 1 if variant == "release" else 0
    return [*_fit(tuple(p * scale for p in base[:-1]), end, first_min), end]


def lr_at(step: int, n_examples: int, base_lr: float = BASE_LR, variant: Variant = "release",
          batch: int = REFERENCE_BATCH, steps: int | None = None) -> float | None:
    """Learning rate of update `step` (0-based), or None once the schedule has ended."""
    warmup, d1, d2, d3, end = schedule(n_examples, variant, batch, steps)
    return piecewise_lr(step, warmup, (d1, d2, d3), end, base_lr * batch / REFERENCE_BATCH)


@dataclass(frozen=True)
class Plan:
    """Everything a fine-tuning run takes from the rule; lr(step) is the schedule itself."""

    precrop: int
    crop: int
    warmup: int
    boundaries: tuple[int, ...]
    end: int
    base_lr: float  # at the reference batch 512; the lr actually used is peak_lr
    batch: int
    mixup_alpha: float
    n_examples: int
    variant: str
    image_size: tuple[int, int] | None = None
    steps_override: int | None = None
    resolution_overridden: bool = False

    @property
    def peak_lr(self) -> float:
        """The lr after warmup at this batch size: base_lr * batch / 512."""
        return self.base_lr * self.batch / REFERENCE_BATCH

    @property
    def images_seen(self) -> int:
        """Training images processed over the whole schedule (end x batch)."""
        return self.end * self.batch

    def lr(self, step: int) -> float | None:
        """Learning rate of update `step` (0-based), or None once training is over."""
        return piecewise_lr(step, self.warmup, self.boundaries, self.end, self.peak_lr)

    def phases(self) -> list[tuple[str, int, int, str]]:
        """(name, first step, last step, lr description) for every non-empty phase, in order."""
        out: list[tuple[str, int, int, str]] = []
        if self.warmup > 0:
            last = min(self.warmup, self.end) - 1
            out.append(("warmup", 0, last, f"linear {self.lr(0):.3g} -> {self.lr(last):.4g}"))
        starts = [self.warmup] + [b + 1 for b in self.boundaries]
        stops = list(self.boundaries) + [self.end - 1]
        for i, (a, b) in enumerate(zip(starts, stops, strict=True)):  # phase i runs at peak / 10**i
            a = max(a, self.warmup)
            if a <= b and a < self.end:
                name = "constant" if i == 0 else f"decay {i}"
                out.append((name, a, min(b, self.end - 1), f"{self.lr(a):.4g}"))
        return out

    def describe(self) -> str:
        """A multi-line, human-readable statement of the plan."""
        size = f" of {self.image_size[0]}x{self.image_size[1]} px" if self.image_size else ""
        lines = [f"BiT-HyperRule ({self.variant}) for {self.n_examples:,} training examples{size}"]
        why = "set by --resolution" if self.resolution_overridden else (
            "image area < 96*96" if self.crop == 128 else "image area >= 96*96")
        lines.append(f"  resolution: squash-resize to {self.precrop}x{self.precrop}, random {self.crop}x{self.crop} "
                     f"crop + horizontal flip ({why}); evaluation squashes to {self.crop}x{self.crop}")
        lines.append(f"  optimizer: SGD momentum 0.9, no weight decay, batch {self.batch}, lr {self.peak_lr:.4g}")
        if self.batch != REFERENCE_BATCH:
            lines.append(f"  batch scaling: batch {self.batch} instead of {REFERENCE_BATCH}: lr x {self.batch}/"
                         f"{REFERENCE_BATCH} ({self.base_lr:g} -> {self.peak_lr:.4g})"
                         + ("" if self.steps_override else f", steps x {REFERENCE_BATCH}/{self.batch}"))
        if self.steps_override:
            lines.append(f"  length: {self.end} steps set by --steps; phases moved proportionally")
        lines.append(f"  {'phase':10s} {'steps':>17s} {'count':>7s}  lr")
        for name, a, b, lr in self.phases():
            lines.append(f"  {name:10s} {a:>8d}-{b:<8d} {b - a + 1:>7d}  {lr}")
        mix = "off" if self.mixup_alpha == 0 else f"one lambda ~ Beta({self.mixup_alpha:g}, {self.mixup_alpha:g}) per step"
        why_mix = f"{'<' if self.mixup_alpha == 0 else '>='} {MIXUP_THRESHOLD:,} examples"
        lines.append(f"  mixup: alpha {self.mixup_alpha:g} ({mix}; {why_mix})")
        epochs = self.images_seen / self.n_examples
        lines.append(f"  total: {self.end:,} steps x {self.batch} = {self.images_seen:,} images seen "
                     f"({epochs:,.1f} passes over the training set)")
        idle = idle_warning(self.warmup, self.end)
        return "\n".join(lines + ([idle] if idle else []))


def make_plan(n_examples: int, image_size: tuple[int, int], batch: int = REFERENCE_BATCH, steps: int | None = None,
              variant: Variant = "release", base_lr: float = BASE_LR, arch: str | None = None,
              resolution_override: tuple[int, int] | None = None) -> Plan:
    """The complete HyperRule plan for a training set of n_examples images of size (h, w)."""
    if not (isinstance(base_lr, (int, float)) and math.isfinite(base_lr) and base_lr > 0):
        raise UserError(f"base lr must be a positive number, got {base_lr!r}")
    warmup, d1, d2, d3, end = schedule(n_examples, variant, batch, steps)
    if resolution_override is not None:
        precrop, crop = (int(v) for v in resolution_override)
        if crop < 1 or precrop < crop:
            raise UserError(f"resolution must satisfy 1 <= crop <= precrop, got precrop {precrop}, crop {crop}")
    else:
        precrop, crop = resolution(image_size, variant, arch)
    return Plan(precrop=precrop, crop=crop, warmup=warmup, boundaries=(d1, d2, d3), end=end, base_lr=float(base_lr),
                batch=batch, mixup_alpha=mixup_alpha(n_examples), n_examples=n_examples, variant=variant,
                image_size=(int(image_size[0]), int(image_size[1])), steps_override=steps,
                resolution_overridden=resolution_override is not None)
