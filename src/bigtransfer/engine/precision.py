"""The one precision table: every precision a run, an evaluation or the inference path can be asked for.

Kept free of torch so that the command line can list the names without loading it (`engine.device` maps each name
to its torch dtype).
"""

from __future__ import annotations

from ..core.errors import UserError

# name -> the torch dtype it computes in (by name; `engine.device.PRECISIONS` holds the dtypes themselves).
PRECISION_DTYPES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PRECISION_NAMES: tuple[str, ...] = tuple(PRECISION_DTYPES)
# Without a gradient scaler (pre-training, inference): fp16's small gradients would underflow.
UNSCALED_PRECISIONS: tuple[str, ...] = tuple(p for p in PRECISION_NAMES if p != "fp16")


def check_precision(precision: str, allowed: tuple[str, ...] = PRECISION_NAMES) -> None:
    """Refuse a precision name outside `allowed` (by default every name of the table)."""
    if precision not in allowed:
        raise UserError(f"precision must be one of {', '.join(allowed)}, got {precision!r}")
