"""Resuming an optimizer across memory layouts and update kernels (fused / multi-tensor) continues the same run."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bigtransfer.engine.device import sgd
from bigtransfer.engine.runstate import load_run_state, save_run_state
from bigtransfer.model.resnetv2 import ResNetV2

CPU = torch.device("cpu")


def _step(model: ResNetV2, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    y = torch.randint(0, 5, (4,), generator=g)
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _model(layout: torch.memory_format) -> ResNetV2:
    torch.manual_seed(0)
    return ResNetV2("R14x0.5", 5, zero_head=False).to(memory_format=layout)


def test_resume_nchw_multi_tensor_state_into_channels_last_fused(tmp_path):
    kwargs = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    # Reference: three updates in one NCHW run with the multi-tensor update.
    ref = _model(torch.contiguous_format)
    ref_opt = sgd(ref.parameters(), CPU, fused=False, **kwargs)
    # The same run stopped after two updates ...
    first = _model(torch.contiguous_format)
    first_opt = sgd(first.parameters(), CPU, fused=False, **kwargs)
    for seed in (1, 2):
        _step(ref, ref_opt, seed)
        _step(first, first_opt, seed)
    save_run_state(tmp_path / "state.pt", model=first, optimizer=first_opt, step=2)
    _step(ref, ref_opt, 3)
    # ... and resumed in channels-last with the fused update.
    resumed = _model(torch.channels_last)
    opt = sgd(resumed.parameters(), CPU, **kwargs)
    assert load_run_state(tmp_path / "state.pt", model=resumed, optimizer=opt)[0] == 2
    assert opt.param_groups[0]["fused"] is True  # the saving run's kernel choice did not come along
    conv = resumed.stages[0][0].conv2.weight
    assert opt.state[conv]["momentum_buffer"].stride() == conv.stride()
    _step(resumed, opt, 3)
    want, got = ref.state_dict(), resumed.state_dict()
    moved = sum(float((want[k] - first.state_dict()[k]).norm() ** 2) for k in want) ** 0.5
    diff = sum(float((want[k] - got[k]).norm() ** 2) for k in want) ** 0.5
    assert moved > 0 and diff < 1e-4 * moved
