"""Runs saved by the code before the one-house redesign resume with today's code and end as an unbroken run.

tests/fixtures/old_runs holds a fine-tuning and a pre-training run stopped after update 2 of 4, as that code wrote
them (make_old_runs.py there says how); only the values of the large tensors of state.pt were left out to keep the
files small. They are put back from a run of today's code stopped at the same update (equal when resume is exact).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from bigtransfer.cli import main
from bigtransfer.engine.metrics import read_jsonl
from bigtransfer.engine.runstate import read_run_state
from bigtransfer.transfer.finetune import FinetuneConfig, run_finetune

from .test_finetune import make_image_folder
from .test_pretrain import write_shapes_dataset
from .test_runs_survive import _assert_same_weights, _no_timings

FIXTURES = Path(__file__).parent / "fixtures" / "old_runs"
FT = dict(model="R14x0.5", steps=4, batch=4, resolution=(36, 32), base_lr=0.3, save_every=1, eval_every=2, workers=0,
          quiet=True)
PT = ["--model", "R14x0.5", "--steps", "4", "--batch", "8", "--resolution", "32", "--lr", "0.05", "--warmup-steps", "2",
      "--log-every", "1", "--eval-every", "2", "--save-every", "1", "--holdout", "0.25", "--workers", "0", "--quiet"]


class _Stop(Exception):
    pass


def _stop_at_2(done, record):
    if done == 2:
        raise _Stop


def _run(verb: str, data: Path, out: Path, half: bool = False) -> None:
    if verb == "finetune":
        try:
            run_finetune(FinetuneConfig(data=str(data), out=str(out), **FT), on_step=_stop_at_2 if half else None)
        except _Stop:
            assert half
    else:
        assert main(["pretrain", "--data", str(data), "--out", str(out), *PT, *(["--stop-after", "2"] if half else [])]) == 0


def _is_placeholder(t: torch.Tensor) -> bool:
    return t.numel() > 1000 and all(s == 0 for s in t.stride())


def _revive(old, new, path: str = ""):
    """`old` with every placeholder replaced by the tensor at the same place in `new` (same shape and dtype)."""
    if isinstance(old, torch.Tensor):
        if not _is_placeholder(old):
            return old
        assert isinstance(new, torch.Tensor) and new.shape == old.shape and new.dtype == old.dtype, path
        return new.clone()
    if isinstance(old, dict):
        assert isinstance(new, dict), path
        return {k: _revive(v, new.get(k), f"{path}/{k}") for k, v in old.items()}
    if isinstance(old, (list, tuple)):
        assert isinstance(new, (list, tuple)) and len(new) == len(old), path
        return type(old)(_revive(v, n, f"{path}/{i}") for i, (v, n) in enumerate(zip(old, new, strict=True)))
    return old


def _moved(tree, old_data: str, new_data: str):
    """`tree` with the old data path replaced: where the data lives is the one thing that differs from then."""
    if isinstance(tree, str):
        return new_data if tree == old_data else tree
    if isinstance(tree, dict):
        return {k: _moved(v, old_data, new_data) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_moved(v, old_data, new_data) for v in tree]
    return tree


def _old_run(verb: str, data: Path, half: Path, run: Path) -> None:
    """The fixture as a run folder for `data`, its placeholders filled from `half` (today's code, stopped at 2)."""
    src = FIXTURES / verb
    old_data = (src / "data_path.txt").read_text().strip()
    run.mkdir()
    shutil.copyfile(src / "metrics.jsonl", run / "metrics.jsonl")
    config = _moved(json.loads((src / "config.json").read_text()), old_data, str(data))
    (run / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    old = torch.load(src / "state.pt", map_location="cpu", weights_only=True)
    new = read_run_state(half / "state.pt")
    assert sorted(old) == sorted(new) and old["step"] == new["step"] == 2
    state = _moved(_revive(old, new), old_data, str(data))
    if "fingerprint" in state["extra"]:  # a digest of the data's file names, which include where it lives
        state["extra"]["fingerprint"] = new["extra"]["fingerprint"]
    torch.save(state, run / "state.pt")


def _assert_same_log_as_then(old_run: Path, straight: Path) -> None:
    """The resumed run's log: the old code's records up to update 2 (values within float noise: another machine may
    sum in another order), then records equal to the unbroken run's."""
    ra, rb = read_jsonl(old_run / "metrics.jsonl"), read_jsonl(straight / "metrics.jsonl")
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for a, b in zip(ra, rb, strict=True):
        a, b = _no_timings(a), _no_timings(b)
        if a["step"] > 2:
            assert a == b
        else:
            assert a.keys() == b.keys()
            for k in a:
                if isinstance(a[k], float):
                    assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6), (a["step"], k)


@pytest.mark.parametrize("verb", ["finetune", "pretrain"])
def test_a_run_saved_before_the_redesign_resumes_as_an_unbroken_run(verb, tmp_path):
    if verb == "finetune":
        data = make_image_folder(tmp_path / "colours", per_class=6)
    else:
        data = write_shapes_dataset(tmp_path / "shapes", n=32)
    _run(verb, data, tmp_path / "half", half=True)
    _old_run(verb, data, tmp_path / "half", tmp_path / "old")
    _run(verb, data, tmp_path / "old")  # the same command resumes the old run
    _run(verb, data, tmp_path / "straight")
    _assert_same_weights(tmp_path / "old" / "checkpoint.safetensors", tmp_path / "straight" / "checkpoint.safetensors")
    _assert_same_log_as_then(tmp_path / "old", tmp_path / "straight")
