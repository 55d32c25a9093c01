"""Scale-out: torchrun with 2 Gloo processes computes what 1 process computes, and runs resume on another world size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigtransfer.upstream import distributed as du

from .test_pretrain import first_sigmoid_loss, write_shapes_dataset

# Same seed and global batch everywhere; lr high enough that 4 updates move the weights by about 1%,
# so that agreement to 1e-4 says something about the updates, not only about the shared start.
COMMON = ["--model", "R14x0.5", "--steps", "4", "--batch", "16", "--resolution", "32", "--lr", "0.05",
          "--warmup-steps", "1", "--log-every", "1", "--workers", "0", "--quiet", "--holdout", "0.14"]


def _torchrun(args: list[str], timeout: float = 240, fails: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "bigtransfer", "pretrain", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert (done.returncode != 0) == fails, f"torchrun exit {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def _run_here(args: list[str]) -> None:
    """The same command in this process, alone (world size 1)."""
    from bigtransfer.cli import main

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["pretrain", *args]) == 0
    finally:
        torch.set_num_threads(before)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from bigtransfer import read_checkpoint

    return {k: v.double() for k, v in read_checkpoint(run / "checkpoint.safetensors")[0].items()}


def _initial_weights() -> dict[str, torch.Tensor]:
    from bigtransfer import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the run's seed
        return {k: v.double() for k, v in create_model("R14x0.5", num_classes=6, pretrained=False).state_dict().items()}


def _norm(state: dict[str, torch.Tensor]) -> float:
    return sum(float(v.pow(2).sum()) for v in state.values()) ** 0.5


def _relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||a|| over all tensors together."""
    return _norm({k: a[k] - b[k] for k in a}) / _norm(a)


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def data_and_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    manifest = write_shapes_dataset(root, n=64)
    _run_here(["--data", str(manifest), "--out", str(root / "one"), *COMMON])
    return manifest, root


def test_two_gloo_processes_match_one(data_and_reference):
    manifest, root = data_and_reference
    done = _torchrun(["--data", str(manifest), "--out", str(root / "two"), *COMMON])
    one, two, init = _weights(root / "one"), _weights(root / "two"), _initial_weights()
    summary = json.loads((root / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "gloo"
    moved = {k: one[k] - init[k] for k in one}
    assert _norm(moved) > 3e-3 * _norm(init)  # 4 updates moved the weights by far more than the tolerance
    assert _relative(one, two) < 1e-4
    # The updates themselves agree, not only the shared starting point.
    assert _relative(moved, {k: two[k] - init[k] for k in two}) < 1e-3
    assert _losses(root / "two") == pytest.approx(_losses(root / "one"), rel=1e-5)
    assert "Grad strides do not match" not in done.stderr  # see the test below


def test_resume_across_world_sizes_with_fsdp(data_and_reference):
    manifest, root = data_and_reference
    run = root / "one_two_one"
    args = ["--data", str(manifest), "--out", str(run), *COMMON]
    # 1 process does update 1 and stops (as if its job's time ran out) ...
    _run_here([*args, "--stop-after", "1"])
    # ... 2 processes, sharded (FSDP FULL_SHARD) with activation checkpointing and 2 micro-batches each, load that
    # state (broadcast from rank 0), do updates 2 and 3 and stop, as if a node had died after the checkpoint ...
    done = _torchrun([*args, "--fsdp", "--grad-checkpointing", "--batch-split", "2", "--stop-after", "3"])
    assert "stopped after update 3 of 4" in done.stdout
    assert not (run / "checkpoint.safetensors").exists()
    # ... and 1 plain process finishes from the sharded run's saved state.
    _run_here(args)
    one, resumed, init = _weights(root / "one"), _weights(run), _initial_weights()
    assert _relative(one, resumed) < 1e-4
    assert _relative({k: one[k] - init[k] for k in one}, {k: resumed[k] - init[k] for k in one}) < 1e-3
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # one log, as if never interrupted
    assert _losses(run) == pytest.approx(_losses(root / "one"), rel=1e-5)
    evals = [r for r in records if "eval_loss" in r]
    reference = [r for r in map(json.loads, (root / "one" / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert [r["eval_examples"] for r in evals] == [9, 9, 9, 9]  # 5 + 4 held-out images on 2 ranks, lockstep
    # Sharded, checkpointed, split updates sum in another order: the weights agree to 1e-4 (above), and so do the
    # losses (with the multi-label default, sigmoid from bias -10, the last one differed by 1.2e-5 relative).
    assert [r["eval_loss"] for r in evals] == pytest.approx([r["eval_loss"] for r in reference], rel=1e-4)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"] == 3 and summary["world_size"] == 1


def test_single_process_environment(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    env = du.init_distributed("cpu")
    assert (env.rank, env.world_size, env.is_main, env.distributed, env.backend) == (0, 1, True, False, None)
    assert du.rank() == 0 and du.is_main()
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(du.all_reduce_sum(t), t) and du.all_reduce_sum(t) is not t
    assert du.broadcast_object({"a": 1}) == {"a": 1}
    assert du.any_process(True, env.device) and not du.any_process(False, env.device)


def test_torchrun_with_one_process_joins_a_group_and_wraps(monkeypatch):
    """torchrun --nproc_per_node 1 takes the multi-process path (Gloo here, NCCL on a GPU), DDP and FSDP included."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(port))):
        monkeypatch.setenv(var, value)
    env = du.init_distributed("cpu")
    try:
        assert (env.world_size, env.backend, env.distributed) == (1, "gloo", True)
        assert torch.distributed.is_initialized()
        assert type(du.wrap_ddp(torch.nn.Linear(2, 2), env)).__name__ == "DistributedDataParallel"
        assert du.all_reduce_sum(torch.tensor([3.0])).item() == 3.0
    finally:
        du.cleanup()
    assert not torch.distributed.is_initialized()


def test_gradients_laid_out_unlike_their_weights_are_1x1_kernels_in_the_same_bytes():
    """Why wrap_ddp silences DDP's "Grad strides do not match bucket view strides" warning in channels-last.

    This backward uses the default kernels, as a multi-process run does unless it resumes a run that measured
    its own (kernels.json); under those measured choices the same twelve 1x1 weights differ (checked once)."""
    from bigtransfer import create_model
    from bigtransfer.engine.device import training_layout

    layout = training_layout(torch.device("cpu"), channels_last=True)
    model = create_model("R14x0.5", num_classes=3, pretrained=False).to(memory_format=layout)
    model(torch.randn(2, 3, 32, 32).to(memory_format=layout)).sum().backward()
    differ = {name: p for name, p in model.named_parameters() if p.grad.stride() != p.stride()}
    assert differ, "no gradient is laid out unlike its weight: the warning filter is not needed"
    for name, p in differ.items():
        assert p.shape[2:] == (1, 1), name
        sized = [d for d in range(p.dim()) if p.shape[d] > 1]  # strides of size-1 dimensions address nothing
        assert [p.stride(d) for d in sized] == [p.grad.stride(d) for d in sized], name


def test_half_configured_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(RuntimeError, match="MASTER_ADDR not set; start the processes with torchrun"):
        du.init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(RuntimeError, match="WORLD_SIZE='two' is not an integer"):
        du.init_distributed("cpu")


def test_init_from_on_two_processes_matches_one(data_and_reference):
    """Rank 0 loads --init-from first and the other rank after it; both start from the checkpoint's weights (under
    FSDP, which does not broadcast initial weights: a rank that ignored --init-from would train another model)."""
    manifest, root = data_and_reference
    # Both in NCHW (FSDP's layout), so that only the order of the sums differs.
    args = ["--data", str(manifest), "--init-from", str(root / "one" / "checkpoint.safetensors"), *COMMON,
            "--no-channels-last"]
    _run_here([*args, "--out", str(root / "init_one")])
    _torchrun([*args, "--out", str(root / "init_two"), "--fsdp"])
    start, one, two = _weights(root / "one"), _weights(root / "init_one"), _weights(root / "init_two")
    moved = {k: one[k] - start[k] for k in one}
    assert _norm(moved) > 1e-2 * _norm(start)
    # From a trained start the 4 updates move the weights about 8x farther than from random ones (measured 2.4%),
    # and FSDP's sums in another order differ with them: measured 1.3e-4 of the weights, 5e-3 of the update. A
    # rank that started from other weights would be off by the size of the weights themselves. The limits leave
    # 6-8x room for other CPUs' kernels, which sum in other orders again.
    assert _relative(one, two) < 1e-3
    assert _relative(moved, {k: two[k] - start[k] for k in two}) < 3e-2
    assert _losses(root / "init_two") == pytest.approx(_losses(root / "init_one"), rel=5e-4)  # measured 5.9e-5
    # The head is kept (the same classes): the first loss is far below a fresh sigmoid head's (bias -10: 2-3
    # positives of 6 give at least 20), which is where the run from random weights began.
    assert _losses(root / "one")[0] >= first_sigmoid_loss(2, 6) > 20 > 2 * _losses(root / "init_one")[0]


def test_an_error_on_rank_0_stops_both_processes_with_the_error_status(data_and_reference, tmp_path):
    """Rank 0 reads --init-from alone; when it cannot, every rank stops with a one-line error and status 2, not
    with a traceback, a hang until the collective timeout, or an abort at exit (see finish_together)."""
    manifest, _ = data_and_reference
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    done = _torchrun(["--data", str(manifest), "--out", str(tmp_path / "run"), "--init-from", str(bad), *COMMON],
                     fails=True)
    assert str(bad) in done.stderr and "rank 0 stopped: " in done.stderr
    assert "bigtransfer/upstream" not in done.stderr  # no traceback from a rank
    # torchrun reports the first rank to fail (and may stop the other one itself).
    assert "exitcode  : 2 " in done.stderr and "SIGABRT" not in done.stderr, done.stderr[-3000:]
