"""Shared test settings: small thread count so parallel suites stay fast on 2 cores."""

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's real download cache from a test."""
    monkeypatch.setenv("BIGTRANSFER_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("BIGTRANSFER_OFFLINE", "1")
