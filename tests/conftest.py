"""Shared test settings: small thread count so parallel suites stay fast on 2 cores."""


import os

import pytest
import torch

# Also for the subprocesses that tests start with a copy of os.environ taken at import: never time kernels.
os.environ["BIGTRANSFER_CALIBRATE"] = "0"

# One thread: measured 4-5x faster than two for these tiny models on a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's real download cache from a test, nor time kernels (tests that do inject a timer)."""
    monkeypatch.setenv("BIGTRANSFER_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("BIGTRANSFER_OFFLINE", "1")
    monkeypatch.setenv("BIGTRANSFER_CALIBRATE", "0")
