"""Checks shared by the run configs and writers: positive integers, output folders and files, named in messages."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import UserError


def check_positive(name: str, value: object, allow_none: bool = False) -> None:
    """Raise ValueError unless `value` is an int >= 1 (or None, when allowed); bools are refused."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")


def check_positive_all(name: str, values: Iterable[object]) -> None:
    """check_positive on every value, and refuse an empty collection."""
    values = list(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise UserError(f"{name} must be positive integers, got {values!r}")


def check_out_folder(out: str | Path, what: str = "a folder", flag: str = "--out") -> None:
    """Refuse an --out (or another `flag`) that exists and is not a directory."""
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a directory; {flag} must name {what}")


def check_out_file(out: str | os.PathLike, what: str = "--out") -> None:
    """Refuse, before any work is done, an output file that cannot be written; the message names `out`.

    Refused: an existing directory, a path under a file, and a folder this process cannot create files in
    (probed by creating and removing an empty file there, the way the atomic writer will).
    """
    p = Path(out).expanduser()
    if p.is_dir():
        raise UserError(f"{out}: is a directory; {what} must name a file")
    ancestor = p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{out}: cannot be created, {ancestor} is not a directory")
    if ancestor != p.parent:
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise UserError(f"{out}: cannot create its folder in {ancestor} (permission denied)")
        return
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=ancestor)
    except OSError as e:
        raise UserError(f"{out}: cannot write into {ancestor} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)
