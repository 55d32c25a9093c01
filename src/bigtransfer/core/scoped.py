"""A context variable set for the length of a `with` block: how the kernel choices reach the layers that use them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def scoped(var: ContextVar[T], value: T) -> Iterator[T]:
    """Inside: `var` holds `value` (in this thread or task only); after: what it held before."""
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)
