"""The CUDA paths, exercised on a GPU: `pytest -m cuda` (make gpu-check). Every test skips without CUDA.

Tolerances, per precision, and why:
- fp32 with TF32 off: the CPU contract, 1e-4 relative (only summation order differs).
- fp32 as PyTorch runs it by default on Ampere and later (cuDNN convolutions in TF32, a 10-bit mantissa, unit
  roundoff 2^-11 = 4.9e-4): 1e-2 relative on logits after ~26 layers, each renormalised by GroupNorm.
- bf16 (8-bit mantissa, unit roundoff 2^-9 = 2e-3, about 4x TF32's): 0.1 relative on logits, as the CPU bf16 test.
- fp16 (11-bit mantissa, unit roundoff 2^-12 = 2.4e-4, but activations and GroupNorm statistics in fp16 under
  autocast only where safe): 3e-2 relative.
Training runs are compared on their losses after a few steps at a small learning rate, where the same bounds hold
with a factor 2 for the steps' compounding.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with make gpu-check)")]

pytest.importorskip("PIL", reason="the CUDA tests write PNG images (pillow)")
pytest.importorskip("safetensors", reason="checkpoints are safetensors files")

from bigtransfer.deploy.export import export  # noqa: E402
from bigtransfer.deploy.inference_model import prepare_for_inference  # noqa: E402
from bigtransfer.model.resnetv2 import ResNetV2  # noqa: E402
from bigtransfer.transfer.finetune import run_finetune  # noqa: E402

from .test_finetune import make_image_folder, tiny, weights  # noqa: E402
from .test_pretrain import write_shapes_dataset  # noqa: E402

RTOL = {"fp32": 1e-4, "tf32": 1e-2, "bf16": 0.1, "fp16": 3e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max())


def _state_rel(a: dict, b: dict) -> float:
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    return (num / sum(float(b[k].double().pow(2).sum()) for k in a)) ** 0.5


@pytest.fixture()
def no_tf32():
    """fp32 as on the CPU: cuDNN convolutions and matmuls without TF32, restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("colours"))


def _cuda(data: Path, out: Path, **kw):
    return tiny(data, out, device="cuda", **kw)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_finetune_in_each_precision(folder, tmp_path, precision, no_tf32):
    ref = run_finetune(_cuda(folder, tmp_path / "fp32-cpu-like", steps=3))
    got = run_finetune(_cuda(folder, tmp_path / precision, steps=3, precision=precision))
    state = torch.load(tmp_path / precision / "state.pt", weights_only=True, map_location="cpu")
    assert torch.isfinite(torch.tensor(got["loss"]))
    tol = 2 * RTOL[precision]
    assert abs(got["loss"] - ref["loss"]) <= tol * abs(ref["loss"]), (precision, got["loss"], ref["loss"])
    # fp16 on CUDA trains with a GradScaler, whose state is saved for resuming; the others need none.
    assert bool(state.get("scaler")) == (precision == "fp16")
    w = weights(Path(got["checkpoint"]))
    assert all(v.device.type == "cpu" and torch.isfinite(v).all() for v in w.values())


def test_channels_last_and_batch_split_compute_the_same_update(folder, tmp_path, no_tf32):
    base = run_finetune(_cuda(folder, tmp_path / "nchw", steps=2, channels_last=False))
    runs = {"channels-last": run_finetune(_cuda(folder, tmp_path / "cl", steps=2, channels_last=True)),
            "split": run_finetune(_cuda(folder, tmp_path / "split", steps=2, batch_split=2))}
    ref = weights(Path(base["checkpoint"]))
    for name, result in runs.items():
        assert _state_rel(weights(Path(result["checkpoint"])), ref) < RTOL["fp32"], name


def test_kill_and_resume_on_cuda_then_on_cuda_and_on_cpu(folder, tmp_path, no_tf32):
    settings = dict(steps=4, batch=4, save_every=2, eval_every=2)
    straight = run_finetune(_cuda(folder, tmp_path / "straight", **settings))

    def kill_at_3(done, record):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_finetune(_cuda(folder, tmp_path / "killed", **settings), on_step=kill_at_3)
    saved = torch.load(tmp_path / "killed" / "state.pt", weights_only=True)  # no map_location: as saved
    assert saved["step"] == 2
    shutil.copytree(tmp_path / "killed", tmp_path / "killed-cpu")
    on_gpu = run_finetune(_cuda(folder, tmp_path / "killed", **settings))
    on_cpu = run_finetune(tiny(folder, tmp_path / "killed-cpu", device="cpu", **settings))
    ref = weights(Path(straight["checkpoint"]))
    for name, result in (("cuda", on_gpu), ("cpu", on_cpu)):
        assert _state_rel(weights(Path(result["checkpoint"])), ref) < RTOL["fp32"], name


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_prepare_for_inference_against_fp32_eager(precision, no_tf32):
    torch.manual_seed(0)
    model = ResNetV2("R26x0.5", 10, zero_head=False).eval().cuda()
    x = torch.rand(4, 3, 64, 64, device="cuda") * 2 - 1
    with torch.no_grad():
        ref = model(x)
        feats = model.forward_features(x)
    fast = prepare_for_inference(model, precision)
    out = fast(x)
    assert out.dtype == torch.float32 and out.device.type == "cuda"
    assert _rel(out, ref) < RTOL[precision] and _rel(fast.forward_features(x), feats) < RTOL[precision]
    if precision != "fp32":
        assert _rel(out, ref) > 0  # really computed in reduced precision
    # A weight change reaches the fast path (the version-counter check on CUDA tensors).
    with torch.no_grad():
        model.head.bias.add_(1.0)
        assert _rel(fast(x), model(x)) < RTOL[precision]


def test_tf32_default_stays_within_its_bound():
    torch.manual_seed(0)
    model = ResNetV2("R26x0.5", 10, zero_head=False).eval()
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        ref = model(x)
        got = prepare_for_inference(model.cuda())(x.cuda())
    assert _rel(got, ref) < RTOL["tf32"]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_of_a_cuda_model(fmt, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = ResNetV2("R14x0.5", 5, zero_head=False).eval().cuda()
    check = export(model, tmp_path / f"m.{fmt}", fmt, sizes=((64, 64), (48, 32)))
    assert (tmp_path / f"m.{fmt}").is_file()
    assert not check.checked or check.max_rel_error <= 1e-4
    assert next(model.parameters()).device.type == "cuda"  # the caller's model is left where it was


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "bigtransfer", "pretrain", *args]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_torchrun_pretraining_with_nccl(sharding, tmp_path):
    manifest = write_shapes_dataset(tmp_path, n=32)
    out = tmp_path / "run"
    _torchrun(["--data", str(manifest), "--out", str(out), "--model", "R14x0.5", "--steps", "3", "--batch", "8",
               "--resolution", "32", "--lr", "0.05", "--warmup-steps", "1", "--log-every", "1", "--workers", "0",
               "--holdout", "0.25", "--quiet", "--device", "cuda", "--precision", "bf16", *sharding])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "nccl" and summary["world_size"] == 1
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 3 and all(v == v and abs(v) < 1e3 for v in losses)
    assert (out / "checkpoint.safetensors").is_file()


def _allocated() -> int:
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def _one_run(folder: Path, out: Path) -> None:
    run_finetune(_cuda(folder, out, steps=2))
    fast = prepare_for_inference(ResNetV2("R14x0.5", 3).cuda())
    fast(torch.zeros(2, 3, 32, 32, device="cuda"))


def test_memory_is_released_after_a_run(folder, tmp_path):
    # The first run also creates what lives as long as the process (cuBLAS/cuDNN workspaces held by the caching
    # allocator); a run that released its own tensors leaves the second run's count where it started.
    _one_run(folder, tmp_path / "warm")
    before = _allocated()
    _one_run(folder, tmp_path / "run")
    leaked = _allocated() - before
    assert leaked <= 1024**2, f"{leaked / 1024**2:.1f} MiB still allocated after a fine-tuning run and an inference"
