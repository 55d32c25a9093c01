"""DataLoader workers outlive a SIGTERM for a grace period, then end: a parent waiting for them never hangs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from bigtransfer.core import runfolder
    runfolder.WORKER_SIGTERM_GRACE_S = float(sys.argv[1])
    runfolder.defer_sigterm(0)
    print("ready", flush=True)
    time.sleep(60)
""")


def test_a_worker_survives_sigterm_for_the_grace_period_then_ends():
    grace = 4.0  # seconds: room for this process to be descheduled between the signal and the check below
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(grace)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        child.terminate()
        time.sleep(0.5)
        assert child.poll() is None  # still serving batches while the training process saves
        assert child.wait(timeout=30) == 0  # then gone: multiprocessing's exit handler can join it
        assert grace <= time.monotonic() - t0 < grace + 20
    finally:
        child.kill()
