"""Shared test settings: small thread count so parallel suites stay fast on 2 cores."""


import os

import pytest
import torch

# A shell or CI runner may carry settings that change what runs: our own (a base URL, no folder lock, a kill
# point), torchrun's (a rank), a proxy that would take the requests meant for the tests' servers on 127.0.0.1.
# The suite, and the subprocesses its tests start with a copy of os.environ, run without them.
for _name in [n for n in os.environ if n.startswith("BIGTRANSFER_")] + ["RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                        "MASTER_ADDR", "MASTER_PORT"]:
    os.environ.pop(_name, None)
os.environ["NO_PROXY"] = os.environ["no_proxy"] = ",".join(
    [os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or "", "127.0.0.1,localhost"]).lstrip(",")
# Never time kernels (tests that do inject a timer) nor download, even in subprocesses given a copy taken now.
os.environ["BIGTRANSFER_CALIBRATE"] = "0"
os.environ["BIGTRANSFER_OFFLINE"] = "1"

# One thread: measured 4-5x faster than two for these tiny models on a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's real download cache from a test, nor time kernels (tests that do inject a timer)."""
    monkeypatch.setenv("BIGTRANSFER_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("BIGTRANSFER_OFFLINE", "1")
    monkeypatch.setenv("BIGTRANSFER_CALIBRATE", "0")
