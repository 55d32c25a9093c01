"""Loaders whose worker processes leave SIGTERM to the run, and stop when the run ends, not 20 s after it.

A job scheduler signals every process of a job; a worker that died of it at once would fail the training process
mid-step, so the workers defer SIGTERM (`bigtransfer.core.runfolder.defer_sigterm`) and the run stops them after
saving. PyTorch stops a loader's workers from its iterator once nothing refers to that iterator. But a run's frames
can outlive the run in garbage cycles (matplotlib's mathtext parser caches exceptions, whose tracebacks hold the
frames of their callers), and then the collector finalizes the iterator's queues before the iterator: its stop
message is lost, each worker is joined for 5 s and sent SIGTERM, which it defers. At interpreter exit, that made
every run with workers end WORKER_SIGTERM_GRACE_S late. So a run stops its loaders' workers itself, on leaving
`workers_stopped()`, and whatever is left is stopped at exit, before multiprocessing's exit handler signals them.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing.util
import weakref
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..core.runfolder import defer_sigterm
from ..core.scoped import scoped

__all__ = ["loader", "stop_all_workers", "workers_stopped"]

_EVERY: weakref.WeakSet[Any] = weakref.WeakSet()  # the iterators with workers of this process, until freed
_RUN: ContextVar[weakref.WeakSet[Any] | None] = ContextVar("bigtransfer_run_iterators", default=None)


class _StoppableLoader(DataLoader):
    """A DataLoader that remembers its multi-process iterators (weakly), so that they can be stopped on time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The run that made the loader owns it; a loader made elsewhere and read during a run is not stopped with it.
        self._run = _RUN.get()

    def __iter__(self) -> Any:
        if self._iterator is not None and self._iterator._shutdown:
            self._iterator = None  # persistent workers stopped with their run: read again, start new ones
        iterator = super().__iter__()
        if self.num_workers > 0:
            _EVERY.add(iterator)
            if self._run is not None:
                self._run.add(iterator)
        return iterator


def loader(dataset: Dataset, workers: int, persistent: bool = True, pin_memory: bool | None = None,
           **options: Any) -> DataLoader:
    """A DataLoader over `dataset` with `workers` processes that defer SIGTERM (none: decoding in this process).

    persistent: keep the workers between passes (an evaluation set read at every evaluation); pin_memory: None
    pins when there is a CUDA GPU; `options` go to DataLoader as they are (batch_size, batch_sampler, drop_last, ...).
    """
    options["pin_memory"] = torch.cuda.is_available() if pin_memory is None else pin_memory
    if workers > 0:
        options.update(prefetch_factor=4, persistent_workers=persistent, worker_init_fn=defer_sigterm)
    return _StoppableLoader(dataset, num_workers=workers, **options)


def _stop(iterators: weakref.WeakSet[Any]) -> None:
    for iterator in list(iterators):
        # PyTorch's own stop (a message to each worker, then a join); it does nothing a second time.
        iterator._shutdown_workers()


@contextlib.contextmanager
def workers_stopped() -> Iterator[None]:
    """On leaving the block, however it is left, stop the workers of every `loader` made inside it."""
    with scoped(_RUN, weakref.WeakSet()) as mine:
        try:
            yield
        finally:
            _stop(mine)


def stop_all_workers() -> None:
    """Stop the workers of every `loader` iterator of this process that is still referred to."""
    _stop(_EVERY)


# At exit the workers must be stopped before multiprocessing's exit handler signals them, and before PyTorch's
# (after which a loader's own stop does nothing). atexit runs the last-registered handler first, and both were
# registered on importing torch, PyTorch's first; but multiprocessing registers its handler again when its logger
# is first asked for, and then runs first. So the same stop is also the first thing its handler does (finalizers of
# priority >= 0 run before it terminates children; above 10, the priority of the queues' own closing).
atexit.register(stop_all_workers)
multiprocessing.util.Finalize(None, stop_all_workers, exitpriority=100)
