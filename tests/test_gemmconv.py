"""Convolutions as GEMMs: values and gradients against torch's own convolution, the dispatch rule, and its use in
whole training steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bigtransfer.model import gemmconv
from bigtransfer.model.gemmconv import conv2d, gemm_conv2d, prefers_gemm
from bigtransfer.model.resnetv2 import ResNetV2

CL = torch.channels_last


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("k,stride,size", [(1, 1, 5), (1, 2, 7), (3, 1, 4), (3, 2, 7), (3, 2, 8), (7, 2, 9)])
@pytest.mark.parametrize("x_cl,w_cl", [(True, True), (False, False), (True, False)])
def test_values_and_gradients_equal_torch_conv(k, stride, size, x_cl, w_cl):
    torch.manual_seed(0)
    pad = k // 2
    x0 = torch.randn(3, 6, size, size + 1, dtype=torch.float64)
    w0 = torch.randn(5, 6, k, k, dtype=torch.float64)
    gy = None
    results = []
    for fn in (lambda x, w: F.conv2d(x, w, stride=stride, padding=pad), lambda x, w: gemm_conv2d(x, w, stride, pad)):
        x = (x0.contiguous(memory_format=CL) if x_cl else x0.clone()).requires_grad_()
        w = (w0.contiguous(memory_format=CL) if w_cl else w0.clone()).requires_grad_()
        y = fn(x, w)
        if gy is None:
            gy = torch.randn_like(y)
        y.backward(gy)
        results.append((y.detach(), x.grad, w.grad))
        assert x.grad.shape == x.shape and w.grad.shape == w.shape
    for ref, got in zip(results[0], results[1], strict=True):
        assert _rel(got, ref) < 1e-12


def test_output_is_a_fresh_channels_last_tensor_so_in_place_adds_stay_cheap():
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(16, 8, 1, 1).contiguous(memory_format=CL).requires_grad_()
    y = gemm_conv2d(x, w)
    # A view would make y.add_(...) record CopySlices and rebuild the whole base tensor in backward.
    assert y._base is None and y.is_contiguous(memory_format=CL)
    y.add_(torch.ones_like(y))
    assert "CopySlices" not in type(y.grad_fn).__name__
    y.sum().backward()
    assert x.grad.is_contiguous(memory_format=CL)


def test_dispatch_rule(monkeypatch):
    small = torch.randn(2, 8, 4, 4).contiguous(memory_format=CL)
    w1 = torch.randn(16, 8, 1, 1)
    w3 = torch.randn(16, 8, 3, 3)
    assert prefers_gemm(small, w1, 1, 0) and prefers_gemm(small, w3, 1, 1)
    assert not prefers_gemm(small.contiguous(), w1, 1, 0)  # NCHW: the patch matrix would be a copy
    assert not prefers_gemm(small.double(), w1, 1, 0)  # the rule was measured for float32
    assert not prefers_gemm(torch.randn(2, 8, 32, 32).contiguous(memory_format=CL), w1, 1, 0)  # large map
    assert not prefers_gemm(small, torch.randn(16, 8, 5, 5), 1, 2)  # no entry for 5x5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not prefers_gemm(small, w1, 1, 0)
    # 3x3 at 8x8: a GEMM only when a backward follows (oneDNN's backward of that shape is the slow part).
    mid = torch.randn(2, 8, 8, 8).contiguous(memory_format=CL)
    assert not prefers_gemm(mid, w3, 1, 1)
    assert prefers_gemm(mid.requires_grad_(), w3, 1, 1)
    with torch.no_grad():
        assert not prefers_gemm(mid, w3, 1, 1)
    monkeypatch.setattr(gemmconv, "GEMM_MAX_POSITIONS", {})
    assert not prefers_gemm(small, w1, 1, 0)
    # Either way conv2d computes the same convolution.
    assert torch.allclose(conv2d(small, w3, 1, 1), F.conv2d(small, w3, padding=1), atol=1e-5)


def _count_gemm_calls(monkeypatch) -> list[int]:
    calls = [0]
    real = gemmconv.gemm_conv2d

    def spy(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(gemmconv, "gemm_conv2d", spy)
    return calls


def test_channels_last_training_step_matches_nchw(monkeypatch):
    torch.manual_seed(0)
    model = ResNetV2("R26x0.5", 10, zero_head=False)
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    y = torch.randint(0, 10, (4,))
    grads = {}
    calls = _count_gemm_calls(monkeypatch)
    for layout in (torch.contiguous_format, CL):
        model.zero_grad()
        model.to(memory_format=layout)
        F.cross_entropy(model(x), y).backward()
        grads[layout] = {n: p.grad.clone() for n, p in model.named_parameters()}
        if layout is torch.contiguous_format:
            assert calls[0] == 0
    # 64 px: stages 3 and 4 run on 4x4 and 2x2 maps, so their 1x1 and 3x3 convolutions went through GEMMs.
    assert calls[0] >= 8
    for name, g in grads[torch.contiguous_format].items():
        assert _rel(grads[CL][name], g) < 1e-4, name


def test_first_groupnorm_runs_on_nchw_in_a_channels_last_model():
    model = ResNetV2("R14x0.5", 10).to(memory_format=CL)
    seen = {}
    for name, unit in (("first", model.stages[0][0]), ("other", model.stages[1][0])):
        unit.gn1.register_forward_hook(lambda m, i, o, name=name: seen.update({name: (i[0], o.clone())}))  # ReLU: in place
    with torch.no_grad():
        out = model.forward_stages(torch.rand(2, 3, 64, 64))
    gn = model.stages[0][0].gn1
    x, y = seen["first"]
    assert x.is_contiguous(memory_format=CL) and not x.is_contiguous()  # it is given the channels-last map ...
    nchw = F.group_norm(x.contiguous(), gn.num_groups, gn.weight, gn.bias, gn.eps)
    assert torch.equal(y, nchw) and y.is_contiguous(memory_format=CL)  # ... and computes NCHW's result, exactly
    x, y = seen["other"]
    assert torch.equal(y, F.group_norm(x, 32, model.stages[1][0].gn1.weight, model.stages[1][0].gn1.bias))
    assert out[1].is_contiguous(memory_format=CL)
