"""Checks shared by the run configs: positive integers and output folders, with messages that name the setting."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def check_positive(name: str, value: object, allow_none: bool = False) -> None:
    """Raise ValueError unless `value` is an int >= 1 (or None, when allowed); bools are refused."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_positive_all(name: str, values: Iterable[object]) -> None:
    """check_positive on every value, and refuse an empty collection."""
    values = list(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} must be positive integers, got {values!r}")


def check_out_folder(out: str | Path, what: str = "a folder") -> None:
    """Refuse an --out that exists and is not a directory."""
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a directory; --out must name {what}")
