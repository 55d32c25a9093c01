"""Resume state: read with torch's restricted unpickler, so a planted state.pt runs nothing; older files still resume."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from bigtransfer.cli import main
from bigtransfer.engine.runstate import load_run_state, save_run_state
from bigtransfer.transfer.finetune import run_finetune

from .test_finetune import make_image_folder, tiny, weights
from .test_pretrain import write_shapes_dataset

TINY = ["--model", "R14x0.5", "--batch", "4", "--resolution", "36", "32", "--workers", "0", "--quiet"]


class _RunsACommand:
    """Unpickling this calls os.system: what a hostile state.pt would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(path: Path, marker: Path) -> None:
    torch.save({"model": _RunsACommand(marker), "optimizer": {}, "step": 0, "rng": {}, "extra": {}}, path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("colours"), per_class=6)


def _old_format(path: Path) -> None:
    """Rewrite a state.pt as save_run_state wrote it before: Python's RNG tuple and NumPy's ndarray state."""
    payload = torch.load(path, weights_only=True)
    payload["rng"] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(payload, path)


def test_planted_state_runs_nothing_and_an_old_format_state_resumes(folder, tmp_path, capsys):
    settings = dict(steps=3, batch=4, save_every=1, eval_every=3)
    straight = run_finetune(tiny(folder, tmp_path / "straight", keep_state=True, **settings))
    # New saves hold only tensors and plain values: torch's restricted unpickler reads them without any allowlist.
    assert torch.load(tmp_path / "straight" / "state.pt", weights_only=True)["step"] == 3

    def stop_at_1(done, record):
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_finetune(tiny(folder, tmp_path / "old", **settings), on_step=stop_at_1)
    _old_format(tmp_path / "old" / "state.pt")
    resumed = run_finetune(tiny(folder, tmp_path / "old", **settings))
    a, b = weights(Path(straight["checkpoint"])), weights(Path(resumed["checkpoint"]))
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed at step 1 and ended where the straight run did

    # The same command re-run on a folder whose state.pt was replaced by a hostile pickle (config.json matches).
    run = tmp_path / "straight"
    marker = tmp_path / "marker"
    _plant(run / "state.pt", marker)
    capsys.readouterr()
    rc = main(["finetune", "--data", str(folder), "--out", str(run), "--steps", "3", "--save-every", "1",
               "--eval-every", "3", "--base-lr", "0.3", *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and not marker.exists()
    assert f"{run / 'state.pt'}: cannot read the saved run state" in err and "delete it" in err
    assert "posix.system" in err and "weights_only" not in err  # says what was refused, not torch's retry advice


def test_planted_state_in_a_pretrain_run_runs_nothing(tmp_path, capsys):
    manifest = write_shapes_dataset(tmp_path / "shapes", n=8, size=24)
    (tmp_path / "run").mkdir()
    marker = tmp_path / "marker"
    _plant(tmp_path / "run" / "state.pt", marker)
    rc = main(["pretrain", "--data", str(manifest), "--out", str(tmp_path / "run"), "--model", "R14x0.5",
               "--steps", "1", "--batch", "4", "--resolution", "32", "--workers", "0", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and not marker.exists()
    assert f"{tmp_path / 'run' / 'state.pt'}: cannot read the saved run state" in err and "delete it" in err


@pytest.mark.parametrize("payload, problem", [
    ({"optimizer": {}, "step": 1, "rng": {}}, "missing model"),
    ({"model": [1], "optimizer": {"state": {}, "param_groups": []}, "step": 1, "rng": {}}, "'model' is not"),
    ({"model": {}, "optimizer": {"state": {}, "param_groups": []}, "step": "1", "rng": {}}, "'step' is '1'"),
    ([1, 2], "holds a list"),
])
def test_structurally_wrong_state_is_named_with_the_fix(tmp_path, payload, problem):
    torch.save(payload, tmp_path / "state.pt")
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=rf"state\.pt: not a bigtransfer run state \({problem}.*delete it"):
        load_run_state(tmp_path / "state.pt", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_state_of_another_model_is_named_with_the_fix(tmp_path):
    small = torch.nn.Linear(2, 2)
    save_run_state(tmp_path / "state.pt", model=small, optimizer=torch.optim.SGD(small.parameters(), lr=0.1), step=1)
    other = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"state\.pt: the saved run state does not fit this run .*delete it"):
        load_run_state(tmp_path / "state.pt", model=other, optimizer=torch.optim.SGD(other.parameters(), lr=0.1))


@pytest.mark.parametrize("old", [False, True])
def test_both_formats_load_and_leave_the_global_generators_alone(tmp_path, old):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_run_state(tmp_path / "state.pt", model=model, optimizer=opt, step=5)
    if old:
        _old_format(tmp_path / "state.pt")  # captures the same (current) generator states, the old way
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    assert load_run_state(tmp_path / "state.pt", model=model, optimizer=opt)[0] == 5
    # Nothing draws from the global generators (every draw is seeded by step), so loading does not set them.
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want
