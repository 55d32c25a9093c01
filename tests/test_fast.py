"""The inference fast path and the training-speed changes in models.py, against the plain model and HF transformers."""

from __future__ import annotations

import shutil
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from bigtransfer.deploy import engines
from bigtransfer.deploy.engines import compilers_needed
from bigtransfer.deploy.inference_model import InferenceModel, native_precision, prepare_for_inference
from bigtransfer.model.checkpoints import hf_to_state, load_state
from bigtransfer.model.resnetv2 import WS_EPS_PEERS, PlainConv2d, ResNetV2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _model(arch: str = "R26x0.5", classes: int = 10, seed: int = 0) -> ResNetV2:
    """A model whose GroupNorm affines and head are not at their trivial initial values."""
    torch.manual_seed(seed)
    model = ResNetV2(arch, classes, zero_head=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def _images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.rand(n, 3, size, size) * 2 - 1


@pytest.mark.parametrize("channels_last", [True, False])
def test_fp32_matches_plain_model_on_two_sizes(channels_last):
    model = _model()
    fast = prepare_for_inference(model, "fp32", channels_last=channels_last)
    for size in (64, 96):
        x = _images(3, size)
        with torch.no_grad():
            logits, feats = model(x), model.forward_features(x)
        out = fast(x)
        assert out.dtype == torch.float32 and out.shape == logits.shape and not out.requires_grad
        assert _rel(out, logits) < 1e-4
        assert _rel(fast.forward_features(x), feats) < 1e-4
    assert fast.frozen.root.conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_standardized_kernels_are_the_spec_formula():
    model = _model("R14x0.5")
    fast = prepare_for_inference(model)
    w = model.stages[1][0].conv2.weight.detach().double()
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = ((w - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)  # biased, as the spec says
    expected = (w - mean) / torch.sqrt(var + model.ws_eps)
    assert torch.allclose(fast.frozen.stages[1][0].conv2.weight.double(), expected, atol=1e-5)
    assert type(fast.frozen.stages[1][0].conv2) is PlainConv2d  # no standardization left at run time


def test_kernels_computed_once_and_recomputed_after_weight_changes():
    model = _model("R14x0.5")
    x = _images(2, 32)
    fast = prepare_for_inference(model)
    fast(x)
    kernel = fast.frozen.root.conv.weight
    before = kernel.clone()
    fast(x)
    assert fast.frozen.root.conv.weight is kernel and torch.equal(kernel, before)  # cached, not recomputed

    # An optimizer step updates the parameters in place.
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        expected = model(x)
    assert _rel(fast(x), expected) < 1e-4
    assert not torch.equal(fast.frozen.root.conv.weight, before)

    # load_state_dict copies new values in place.
    other = _model("R14x0.5", seed=7)
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert _rel(fast(x), other(x)) < 1e-4

    # A new head changes shapes: the frozen copy is rebuilt.
    model.reset_head(3, zero_init=False)
    with torch.no_grad():
        assert fast(x).shape == (2, 3) and _rel(fast(x), model(x)) < 1e-4

    # Writes through .data bypass version counters: refresh() is the documented way.
    with torch.no_grad():
        model.head.weight.data.mul_(2.0)
    fast.refresh()
    with torch.no_grad():
        assert _rel(fast(x), model(x)) < 1e-4


def test_contract_errors_and_no_duplicate_parameters():
    model = _model("R14x0.5")
    fast = prepare_for_inference(model)
    assert isinstance(fast, InferenceModel) and not fast.training
    assert fast.num_classes == 10 and fast.feature_dim == model.feature_dim
    assert all(not p.requires_grad for p in fast.parameters())
    with pytest.raises(RuntimeError, match="eval-only"):
        fast.train()
    with pytest.raises(ValueError, match="precision"):
        prepare_for_inference(model, "int4")
    with pytest.raises(TypeError, match="ResNetV2"):
        prepare_for_inference(torch.nn.Linear(2, 2))


@pytest.fixture(scope="module")
def digits_model():
    """A tiny model trained briefly on real handwritten digits, so its top-1 classes mean something."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None].repeat(1, 3, 1, 1) / 8 - 1
    x = F.interpolate(x, size=16, mode="bilinear")
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = ResNetV2("R14x0.5", 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    for _ in range(40):
        idx = torch.randint(0, 1200, (64,))
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval(), x[1200:], y[1200:]


def test_bf16_keeps_top1_of_fp32(digits_model):
    model, x, y = digits_model
    with torch.no_grad():
        ref = model(x)
    assert (ref.argmax(1) == y).float().mean() > 0.7  # the model has learned something: top-1 is meaningful
    with nullcontext() if native_precision("bf16", torch.device("cpu")) else pytest.warns(RuntimeWarning, match="emulated"):
        fast = prepare_for_inference(model, "bf16")
    out = fast(x)
    assert out.dtype == torch.float32
    assert 0 < _rel(out, ref) < 0.1  # really computed in reduced precision, and close
    agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
    # 2 of 597 flip on an AMX CPU, all near ties (9 digits have a top-2 gap under twice the typical bf16 error);
    # other CPUs' bf16 kernels round elsewhere. A broken reduced-precision path agrees on a fraction.
    assert agree >= 0.98, f"bf16 top-1 agrees with fp32 on only {agree:.1%} of {len(x)} digits"
    assert _rel(fast.forward_features(x), model.forward_features(x).detach()) < 0.1


def test_grad_checkpointing_gives_same_gradients_and_keeps_less():
    from torch.autograd.graph import saved_tensors_hooks

    model = _model("R26x0.5").train()
    x = _images(2, 64)

    def grads_and_saved_bytes():
        model.zero_grad()
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with saved_tensors_hooks(pack, lambda t: t):
            loss = model(x).square().mean()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()], sum(saved)

    plain, plain_bytes = grads_and_saved_bytes()
    model.set_grad_checkpointing(True)
    ckpt, ckpt_bytes = grads_and_saved_bytes()
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(plain, ckpt, strict=True))
    assert ckpt_bytes < plain_bytes / 3


def test_gradients_match_hf_transformers():
    """Weight standardization's fused forward/backward and the in-place ops give HF's gradients."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BitConfig(layer_type="preactivation", global_padding=None, embedding_dynamic_padding=False,
                                 depths=[1, 1, 1, 1], embedding_size=32, hidden_sizes=[128, 256, 512, 1024],
                                 num_labels=5)
    hf = transformers.BitForImageClassification(cfg).train()
    ours = ResNetV2("R14x0.5", 5, ws_eps=WS_EPS_PEERS).train()
    load_state(ours, hf_to_state(hf.state_dict()), "hf")
    x = _images(2, 64)
    target = torch.tensor([0, 3])
    F.cross_entropy(ours(x), target).backward()
    F.cross_entropy(hf(pixel_values=x).logits, target).backward()
    hf_grads = hf_to_state({k: p.grad for k, p in hf.named_parameters()}, "hf grads")
    checked = 0
    for name, p in ours.named_parameters():
        assert _rel(p.grad, hf_grads[name]) < 1e-4, name
        checked += 1
    assert checked == len(hf_grads)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch by inductor's imports
def test_compiled_path_matches_and_follows_weight_changes():
    """compile=True folds weights into the graph as constants: a weight change must still take effect."""
    model = _model("R14x0.5")
    x = _images(2, 32)
    fast = prepare_for_inference(model, compile=True)
    with torch.no_grad():
        assert _rel(fast(x), model(x)) < 1e-4
        for p in model.parameters():
            if p.ndim == 1:
                p.mul_(1.5)  # GroupNorm affines and head bias: changes the output
        expected = model(x)
    assert _rel(fast(x), expected) < 1e-4


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("train", [False, True])
def test_model_traces_as_one_graph(train):
    """torch.compile must see the whole model: a graph break per convolution (the kernel choices' ContextVar, which
    Dynamo cannot trace) sent compile=True back to eager after the recompile limit, silently, on CPU and GPU."""
    model = _model("R14x0.5").to(memory_format=torch.channels_last).train(train)
    x = _images(2, 32).to(memory_format=torch.channels_last)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    with torch.set_grad_enabled(train):
        out = compiled(x)
        assert _rel(out, model(x)) < 1e-5
    if train:
        out.sum().backward()
        assert all(p.grad is not None for p in model.parameters())


@pytest.mark.skipif(shutil.which(compilers_needed("cpu")[0]) is None, reason="inductor needs a C++ compiler")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compile_engine_compiles_once_per_batch_size_and_pads_smaller_batches():
    """--engine compile: eager's results; a smaller batch (a folder's last) runs padded in a graph already built (a
    new compile costs about a minute on a CPU), only a larger one compiles; the next runner on the same model (evaluate's
    second split) reuses the compiled model."""
    from torch._dynamo.utils import counters

    model = _model("R14x0.5")
    x = _images(3, 32)
    with torch.no_grad():
        want = model.forward_features(x)

    def graphs_after(run, batch: torch.Tensor) -> int:
        out = run(batch)
        assert out.shape[0] == len(batch) and _rel(out, want[:len(batch)]) < 1e-4
        return counters["stats"]["unique_graphs"]

    run = engines.runner(model, "compile", "fp32", features=True)
    start = counters["stats"]["unique_graphs"]
    one = graphs_after(run, x[:1])  # a small first batch (a warm-up image, or a batch with undecodable files)
    assert one > start  # it compiled
    three = graphs_after(run, x)  # larger than any compiled batch: compiles
    assert three > one
    assert graphs_after(run, x[:2]) == three  # padded to 3, the smallest compiled size that holds it
    assert graphs_after(engines.runner(model, "compile", "fp32", features=True), x[:2]) == three  # reused


def test_compile_engine_is_refused_early_without_its_compiler(monkeypatch, tmp_path, capsys):
    from bigtransfer.cli import main
    from bigtransfer.core.errors import UserError

    monkeypatch.setattr(engines.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(UserError, match="g\\+\\+"):
        engines.check_engine("compile", device="cpu")
    engines.check_engine("torch", device="cpu")
    monkeypatch.setenv("CXX", "/opt/cc/bin/my-g++")  # the compiler the environment names is the one looked for
    assert engines.compilers_needed("cpu") == ("/opt/cc/bin/my-g++",)
    # predict and embed refuse before reading any file or model: neither the folder nor the model exists.
    nothing = str(tmp_path / "nothing")
    for verb in (["predict", nothing], ["embed", nothing, "--out", str(tmp_path / "e.npy")]):
        assert main([*verb, "--model", "no-such-model", "--engine", "compile", "--device", "cpu"]) != 0
        assert "my-g++" in capsys.readouterr().err
