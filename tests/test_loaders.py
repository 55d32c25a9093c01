"""Loader workers stop when their run ends, even when the run's frames sit in a reference cycle, and at exit."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch.utils.data import Dataset

from bigtransfer.core.runfolder import WORKER_SIGTERM_GRACE_S
from bigtransfer.data.loaders import loader, stop_all_workers, workers_stopped


class _Numbers(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i)])


def _started_in_a_cycle() -> None:
    """Iterate a one-worker loader once and leave its iterator where only the garbage collector could free it."""
    batches = iter(loader(_Numbers(), workers=1, batch_size=4))
    assert next(batches).flatten().tolist() == [0.0, 1.0, 2.0, 3.0]
    trap: list = [batches]
    trap.append(trap)


def test_leaving_the_block_stops_the_workers_of_the_loaders_iterated_inside():
    before = set(multiprocessing.active_children())
    with workers_stopped():
        _started_in_a_cycle()
        assert len(set(multiprocessing.active_children()) - before) == 1
    # Gone, not merely signalled: a signalled worker defers SIGTERM for WORKER_SIGTERM_GRACE_S.
    assert set(multiprocessing.active_children()) - before == set()


def test_a_loader_made_outside_the_block_keeps_its_workers_and_a_stopped_one_reads_again():
    outside = loader(_Numbers(), workers=1, batch_size=32)
    with workers_stopped():
        inside = loader(_Numbers(), workers=1, batch_size=32)
        assert [len(b) for b in inside] == [32, 32]
        assert [len(b) for b in outside] == [32, 32]
    before = set(multiprocessing.active_children())
    assert [b.flatten()[0].item() for b in outside] == [0.0, 32.0]  # the same workers: none started or stopped
    assert set(multiprocessing.active_children()) == before
    assert [b.flatten()[0].item() for b in inside] == [0.0, 32.0]  # its persistent workers were stopped: new ones
    stop_all_workers()


def test_without_the_block_the_worker_outlives_its_loader_until_stopped():
    before = set(multiprocessing.active_children())
    _started_in_a_cycle()
    assert len(set(multiprocessing.active_children()) - before) == 1  # why the block exists
    stop_all_workers()
    assert set(multiprocessing.active_children()) - before == set()


EXITING = textwrap.dedent("""
    import multiprocessing, time, torch
    from torch.utils.data import Dataset
    from bigtransfer.data.loaders import loader

    multiprocessing.get_logger()  # registers multiprocessing's exit handler again: it now runs first

    class Numbers(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return torch.tensor([float(i)])

    batches = iter(loader(Numbers(), workers=1, batch_size=4))
    next(batches)
    trap = [batches]
    trap.append(trap)
    del batches, trap
    print(*[p.pid for p in multiprocessing.active_children()], time.time(), flush=True)
""")


def test_a_process_with_a_loader_left_in_a_cycle_exits_without_waiting_for_its_worker():
    done = subprocess.run([sys.executable, "-c", EXITING], capture_output=True, text=True, timeout=120)
    ended = time.time()
    assert done.returncode == 0, done.stderr
    *workers, last_line_at = done.stdout.split()
    # Before: multiprocessing's exit handler sent the worker SIGTERM, which it deferred WORKER_SIGTERM_GRACE_S.
    assert ended - float(last_line_at) < WORKER_SIGTERM_GRACE_S / 2
    assert len(workers) == 1
    with pytest.raises(ProcessLookupError):  # stopped, not left behind as an orphan
        os.kill(int(workers[0]), 0)
