"""Learning-rate schedule shapes: linear warm-up, then the peak divided by 10 at each boundary (BiT's), or a cosine
decay to 0 (the distillation paper's)."""

from __future__ import annotations

import math


def piecewise_lr(step: int, warmup: int, boundaries: tuple[int, ...], end: int, peak: float) -> float | None:
    """The rule's lr at `step` for given phase points; None once training is over."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step >= end:
        return None
    if step < warmup:
        return peak * step / warmup
    return peak / 10 ** sum(1 for b in boundaries if b < step)


def cosine_lr(step: int, warmup: int, end: int, peak: float) -> float | None:
    """Linear warm-up from 0 to `peak`, then half a cosine down towards 0 at `end`; None once training is over."""
    if step < warmup or step >= end:  # the same warm-up as the step schedule's (and the same checks)
        return piecewise_lr(step, warmup, (), end, peak)
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (end - warmup)))


def idle_warning(warmup: int, end: int) -> str | None:
    """A warning when a schedule updates at lr 0 only (one step, and that one the first of the warmup)."""
    if end == 1 and warmup > 0:
        return ("warning: the only update is the first warm-up step, whose lr is 0: this run changes no weight; "
                "give more steps")
    return None
