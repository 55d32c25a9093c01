"""The shape of both learning-rate schedules: linear warm-up, then the peak divided by 10 at each boundary."""

from __future__ import annotations


def piecewise_lr(step: int, warmup: int, boundaries: tuple[int, ...], end: int, peak: float) -> float | None:
    """The rule's lr at `step` for given phase points; None once training is over."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step >= end:
        return None
    if step < warmup:
        return peak * step / warmup
    return peak / 10 ** sum(1 for b in boundaries if b < step)


def idle_warning(warmup: int, end: int) -> str | None:
    """A warning when a schedule updates at lr 0 only (one step, and that one the first of the warmup)."""
    if end == 1 and warmup > 0:
        return ("warning: the only update is the first warm-up step, whose lr is 0: this run changes no weight; "
                "give more steps")
    return None
