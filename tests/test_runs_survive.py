"""Runs that survive anything: one owner per run folder, SIGTERM saves and exits 143, and a chaos test of SIGKILLs
at seeded random moments (inside saves included) after which the same command ends bit-identical to an unbroken run.
"""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bigtransfer.core.runfolder as runfolder
import bigtransfer.evaluation.fewshot
import bigtransfer.evaluation.linear
import bigtransfer.evaluation.vtab
import bigtransfer.transfer.distill
import bigtransfer.transfer.finetune
import bigtransfer.upstream.pretrain
from bigtransfer import read_checkpoint
from bigtransfer.cli import main
from bigtransfer.core.atomic import KILL_IN_WRITE_ENV
from bigtransfer.core.errors import UserError
from bigtransfer.core.runfolder import LOCK_FILE, FolderBusy, own_folder, read_owner
from bigtransfer.engine.metrics import read_jsonl
from bigtransfer.transfer.finetune import FinetuneConfig, run_finetune

from .test_finetune import make_image_folder
from .test_pretrain import write_shapes_dataset

# The same thread count as this process (conftest sets 1): CPU kernels may sum in another order with another count.
ENV = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONUNBUFFERED": "1"}
HOLDER = ("import sys, time\nfrom bigtransfer.core.runfolder import own_folder\n"
          "with own_folder(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(300)\n")
FT_TINY = ["--model", "R14x0.5", "--batch", "4", "--resolution", "36", "32", "--base-lr", "0.3", "--quiet"]
PT_TINY = ["--model", "R14x0.5", "--steps", "12", "--batch", "8", "--resolution", "32", "--lr", "0.05",
           "--warmup-steps", "2", "--log-every", "3", "--eval-every", "4", "--save-every", "1", "--holdout", "0.25",
           "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("colours"), per_class=6)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), n=32)


def _start(cmd: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def _hold(path: Path) -> subprocess.Popen:
    """Another process that owns `path` through the library, until killed."""
    proc = _start([sys.executable, "-c", HOLDER, str(path)])
    assert proc.stdout.readline().strip() == "held", proc.stderr.read()
    return proc


def _bigtransfer(*args: str) -> list[str]:
    return [sys.executable, "-m", "bigtransfer", *args]


# ---------------------------------------------------------------- one owner per folder


def test_every_writing_verb_is_refused_at_once_naming_the_owner(folder, manifest, tmp_path, monkeypatch, capsys):
    run = tmp_path / "busy"
    owner = _hold(run)
    try:
        def no_loading(*a, **k):
            raise AssertionError("data loaded although the folder is owned by another process")

        # Where each verb looks the loader up (each imports it by name at its top).
        for module, name in ((bigtransfer.transfer.finetune, "load_splits"), (bigtransfer.evaluation.linear, "load_splits"),
                             (bigtransfer.transfer.distill, "load_splits"), (bigtransfer.transfer.distill, "load_model"),
                             (bigtransfer.evaluation.fewshot, "load_splits"),
                             (bigtransfer.upstream.pretrain, "load_pretrain_data"),
                             (bigtransfer.evaluation.vtab, "read_vtab")):
            monkeypatch.setattr(module, name, no_loading)
        data, out = ["--data", str(folder)], ["--out", str(run)]
        verbs = {
            "finetune": ["finetune", *data, *out, *FT_TINY],
            "pretrain": ["pretrain", "--data", str(manifest), *out, *PT_TINY],
            "distill": ["distill", *data, *out, "--teacher", "BiT-Mini-R26x0.5", "--student", "R14x0.5"],
            "linear": ["evaluate", "linear", *data, *out, "--model", "R14x0.5"],
            "knn": ["evaluate", "knn", *data, *out, "--model", "R14x0.5"],
            "fewshot": ["evaluate", "fewshot", *data, *out, "--model", "R14x0.5", "--shots", "1"],
            "vtab": ["evaluate", "vtab", "--root", str(folder), *out, "--model", "R14x0.5"],
        }
        for name, argv in verbs.items():
            t0 = time.perf_counter()
            rc = main(argv)
            seconds = time.perf_counter() - t0
            err = capsys.readouterr().err.strip()
            assert rc == 2 and err.count("\n") == 0, (name, err)
            assert f"{run}: this" in err and "in use by another process" in err, (name, err)
            assert f"pid {owner.pid} on host {socket.gethostname()}" in err and "choose another --out" in err, err
            assert seconds < 2.0, (name, seconds)
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing written, the owner's lock intact
        assert read_owner(run)["pid"] == owner.pid
    finally:
        _stop(owner)


def test_a_killed_owner_leaves_no_lock(tmp_path):
    run = tmp_path / "run"
    owner = _hold(run)
    with pytest.raises(FolderBusy, match=f"pid {owner.pid}"):
        with own_folder(run):
            pass
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    assert read_owner(run)["pid"] == owner.pid  # its lock file is still there, but no process holds the lock
    with own_folder(run) as held:
        assert held == run and read_owner(run)["pid"] == os.getpid()
        (run / "result.txt").write_text("kept")
    assert sorted(p.name for p in run.iterdir()) == ["result.txt"]  # the lock file goes with its owner


def test_one_owner_within_a_process_and_nothing_left_by_a_refused_run(tmp_path):
    run = tmp_path / "new"
    with pytest.raises(KeyError), own_folder(tmp_path / "deep" / "er" / "run"):
        raise KeyError("a run that fails before writing anything")
    assert list(tmp_path.iterdir()) == []
    with own_folder(run):
        with pytest.raises(FolderBusy, match="this process already uses"):
            with own_folder(tmp_path / "x" / ".." / "new"):
                pass
    assert not run.exists()  # created for the block and left empty: removed
    with pytest.raises(KeyError), own_folder(run):
        raise KeyError("a run that fails before writing anything")
    assert not run.exists()
    (run / "sub").mkdir(parents=True)
    (run / ".checkpoint.safetensors.abc123.partial").write_text("a killed writer's leftover")
    with own_folder(run):
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE, "sub"]


def test_a_filesystem_without_locks_is_refused_with_the_way_out(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(runfolder.fcntl, "lockf", no_locks)
    with pytest.raises(UserError, match="does not support POSIX locks.*BIGTRANSFER_NO_LOCK=1"):
        with own_folder(tmp_path / "run"):
            pass
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("BIGTRANSFER_NO_LOCK", "1")
    with pytest.warns(UserWarning, match="is not locked"), own_folder(tmp_path / "run"):
        assert (tmp_path / "run").is_dir()


# ---------------------------------------------------------------- SIGTERM


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)[0]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _no_timings(record):
    """A metrics record without its wall-clock measurements (they differ between any two runs)."""
    if isinstance(record, dict):
        return {k: _no_timings(v) for k, v in record.items() if "per_s" not in k and k != "seconds"}
    return record


def _assert_same_log(a: Path, b: Path) -> None:
    """Both runs logged the same records (each step once, in order) with the same values, timings aside."""
    ra, rb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    assert [_no_timings(r) for r in ra] == [_no_timings(r) for r in rb]


def _leftovers(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.name.endswith(".partial") or p.name == LOCK_FILE)


def _wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 120) -> bool:
    """Wait until the run logged a record at `step` or later; False when the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if any(r.get("step", 0) >= step for r in read_jsonl(run / "metrics.jsonl")):
            return True
        time.sleep(0.02)
    raise AssertionError(f"{run}: no step {step} within {timeout} s")


def test_sigterm_saves_at_the_step_boundary_exits_143_and_the_same_command_resumes(folder, tmp_path, capsys):
    """SIGTERM to the whole process group, as a scheduler sends it (the DataLoader worker too)."""
    run, straight = tmp_path / "run", tmp_path / "straight"
    # 100 steps of ~20 ms: the signal must land before the run ends, after this process, on a busy machine, has
    # seen step 2 and tried a second owner (12 steps left ~0.2 s for that).
    args = ["--data", str(folder), "--steps", "100", "--save-every", "100", "--eval-every", "100", "--workers", "1",
            *FT_TINY]
    proc = _start(_bigtransfer("finetune", *args, "--out", str(run)), start_new_session=True)
    try:
        assert _wait_for_step(proc, run, 2), proc.communicate()
        assert main(["finetune", *args, "--out", str(run)]) == 2  # a second owner, while the first trains
        assert f"pid {proc.pid}" in capsys.readouterr().err
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        _stop(proc)
    assert proc.returncode == 143, err
    stopped = re.search(r"stopped by SIGTERM after step (\d+) of 100; the state is saved in (.+): run the same "
                        r"command to continue", err)
    assert stopped and stopped[2] == str(run / "state.pt"), err
    step = int(stopped[1])
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, step + 1)) and 2 <= step < 100
    assert _leftovers(run) == [] and not (run / "summary.json").exists()

    assert main(["finetune", *args, "--out", str(run)]) == 0
    assert f"resuming {run} from step {step} of 100" in capsys.readouterr().out  # the state saved at the boundary
    assert main(["finetune", *args, "--out", str(straight)]) == 0
    _assert_same_weights(run / "checkpoint.safetensors", straight / "checkpoint.safetensors")
    _assert_same_log(run, straight)


def test_ctrl_c_says_how_to_resume(folder, tmp_path, capsys):
    def ctrl_c_after_step_2(done, record):
        if done == 2:
            raise KeyboardInterrupt

    config = FinetuneConfig(data=str(folder), out=str(tmp_path / "run"), model="R14x0.5", steps=4, batch=4,
                            resolution=(36, 32), workers=0, silent=True, save_every=1)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(config, on_step=ctrl_c_after_step_2)
    err = capsys.readouterr().err
    assert f"interrupted; the last saved state is in {tmp_path / 'run' / 'state.pt'}: run the same command" in err
    assert _leftovers(tmp_path / "run") == []


# ---------------------------------------------------------------- chaos


def _chaos(cmd: list[str], run: Path, moments: list[tuple[str, object]], rng: random.Random) -> list[str]:
    """Start `cmd` once per moment and end each process there; return what happened (at least 5 kills).

    ("write", "NAME:N"): the process kills itself inside its N-th save of NAME (temporary file written, not yet
    renamed); ("step", K): SIGKILL a random 0-0.15 s after the log reaches K steps past what it held before;
    ("term", K): SIGTERM when the log reaches K steps further, which must end in exit status 143 with a resume hint.
    A run that reaches its end before a moment (the log records steps at wall-clock times) ends the chaos there.
    """
    story = []
    for kind, arg in moments:
        env = {**ENV, KILL_IN_WRITE_ENV: str(arg)} if kind == "write" else ENV
        logged = max((r["step"] for r in read_jsonl(run / "metrics.jsonl")), default=0)
        proc = _start(cmd, env)
        try:
            if kind in ("step", "term") and _wait_for_step(proc, run, logged + int(arg)) and kind == "step":
                time.sleep(rng.uniform(0.0, 0.15))
            if kind != "write" and proc.poll() is None:
                proc.send_signal(signal.SIGTERM if kind == "term" else signal.SIGKILL)
            _, err = proc.communicate(timeout=120)
        finally:
            _stop(proc)
        steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "eval" not in r and "eval_loss" not in r]
        story.append(f"{kind} {arg}: rc {proc.returncode}, logged up to step {max(steps, default=0)}")
        if proc.returncode == 0 and kind != "write":
            break
        expected = {"term": 143, "write": -signal.SIGKILL}.get(kind, -signal.SIGKILL)
        assert proc.returncode == expected, (story, err[-2000:])
        if kind == "term":
            assert "run the same command to continue" in err, err
    print("\n".join(story))
    assert sum(" rc 0," not in line for line in story) >= 5, story
    return story


# Per verb: its arguments and its first moment besides the shared ones: for finetune a kill inside its very first
# save (which used to leave a folder it refused to resume), for pretrain a SIGTERM (finetune's is tested above).
CHAOS = {
    "finetune": (["--steps", "12", "--save-every", "1", "--eval-every", "4", "--workers", "0", *FT_TINY],
                 ("write", "config.json:1")),
    "pretrain": (PT_TINY, ("term", 1)),
}


@pytest.mark.parametrize("verb", sorted(CHAOS))
def test_chaos_killed_at_random_moments_ends_as_an_unbroken_run(verb, folder, manifest, tmp_path, capsys):
    settings, first = CHAOS[verb]
    args = [verb, "--data", str(folder if verb == "finetune" else manifest), *settings]
    run, straight = tmp_path / "run", tmp_path / "straight"
    rng = random.Random(18)
    middle = [("write", f"state.pt:{rng.randint(1, 2)}"), ("write", "metrics.jsonl:1"), ("step", rng.randint(1, 2)),
              ("step", rng.randint(1, 2))]
    rng.shuffle(middle)
    moments = [first, *middle, ("write", "checkpoint.safetensors:1")]
    story = _chaos(_bigtransfer(*args, "--out", str(run)), run, moments, rng)
    assert main([*args, "--out", str(run)]) == 0, (story, capsys.readouterr().err)  # the same command, to the end
    assert main([*args, "--out", str(straight)]) == 0
    _assert_same_weights(run / "checkpoint.safetensors", straight / "checkpoint.safetensors")
    _assert_same_log(run, straight)
    assert _leftovers(run) == [], story
