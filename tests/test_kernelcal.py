"""Kernel calibration: the choice follows the (fake) timer, is never slower than F.conv2d on its layout, is cached
as JSON per machine, a damaged cache is ignored with a warning, and the env var turns it off."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random

import pytest
import torch

from bigtransfer.core.errors import UserError
from bigtransfer.deploy.inference_model import prepare_for_inference
from bigtransfer.model import gemmconv, kernelcal, normlayout
from bigtransfer.model.resnetv2 import ResNetV2

A = (2, 8, 4, 4, 16, 1, 1, 0)  # a 1x1 conv on a 4x4 map
B = (2, 8, 8, 8, 8, 3, 2, 1)  # a strided 3x3


def fake_timer(table: dict, calls: list | None = None) -> kernelcal.Timer:
    """Answers from `table[(candidate, key)]` without running anything."""
    def timer(fn, label):
        if calls is not None:
            calls.append(label)
        return table[label]
    return timer


def test_choice_follows_the_timer():
    times = {A: {"nchw": 5.0, "cl": 3.0, "gemm": 1.0}, B: {"nchw": 2.0, "cl": 4.0, "gemm": 6.0}}
    # channels-last: A at 1 (GEMM) + 2 x B at 4 = 9; NCHW: 5 + 2 x 2 = 9 -> tie, channels-last listed first wins.
    plan = kernelcal.choose({A: 1, B: 2}, times)
    assert plan.channels_last and plan.gemm == {A: True, B: False} and plan.seconds == 9.0
    # Three B layers tip it to NCHW (5 + 3 x 2 = 11 against 1 + 3 x 4 = 13), where nothing is a GEMM.
    plan = kernelcal.choose({A: 1, B: 3}, times)
    assert not plan.channels_last and plan.gemm == {A: False, B: False} and plan.seconds == 11.0
    # A fixed layout is honoured even when the other would be faster.
    assert kernelcal.choose({A: 1, B: 3}, times, layouts=(True,)).channels_last


def test_never_slower_than_plain_conv_on_the_same_layout():
    """By construction, for any timings: each layer's chosen time <= F.conv2d's on the chosen layout."""
    rng = random.Random(0)
    keys = [A, B, (1, 4, 2, 2, 4, 3, 1, 1)]
    for _ in range(200):
        times = {k: {"nchw": rng.uniform(1, 9), "cl": rng.uniform(1, 9),
                     "gemm": rng.choice([None, rng.uniform(1, 9)])} for k in keys}
        counts = {k: rng.randint(1, 4) for k in keys}
        plan = kernelcal.choose(counts, times)
        conv_only = {cl: sum(c * times[k]["cl" if cl else "nchw"] for k, c in counts.items()) for cl in (True, False)}
        assert plan.seconds <= min(conv_only.values())
        for k in keys:
            plain = times[k]["cl" if plan.channels_last else "nchw"]
            chosen = times[k]["gemm"] if plan.gemm[k] else plain
            assert chosen <= plain
            assert not plan.gemm[k] or (plan.channels_last and times[k]["gemm"] < plain)


def test_measure_times_each_candidate_in_two_rounds_and_only_where_the_gemm_applies():
    calls = []
    table = {(c, k): 1.0 for c in kernelcal.CANDIDATES for k in (A, (2, 8, 8, 8, 8, 3, 2, 0))}
    assert kernelcal.measure(A, fake_timer(table, calls)) == {"nchw": 1.0, "cl": 1.0, "gemm": 1.0}
    assert [c for c, _ in calls] == ["cl", "nchw", "gemm", "gemm", "nchw", "cl"]  # the second round reversed
    # Padding 0 on a 3x3 ('SAME' padded beforehand) is not a shape the GEMM path computes.
    assert kernelcal.measure((2, 8, 8, 8, 8, 3, 2, 0), fake_timer(table))["gemm"] is None


def test_a_slow_moment_during_one_timing_does_not_decide_the_choice():
    """The machine stalls while oneDNN's first timing runs (a neighbour's burst): its second timing decides."""
    seen: list = []

    def timer(fn, label):
        seen.append(label)
        if label[0] == "cl":
            return 9.0 if seen.count(label) == 1 else 1.0  # stalled once, then its true 1.0
        return 2.0  # the GEMM: truly slower

    times = kernelcal.measure(A, timer, backward=True)
    assert times == {"nchw": None, "cl": 1.0, "gemm": 2.0}
    assert kernelcal.choose({A: 1}, {A: times}).gemm == {A: False}


def test_plan_caches_per_machine_and_measures_only_new_shapes(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGTRANSFER_CACHE", str(tmp_path))
    table = {(c, k): t for k in (A, B) for c, t in zip(kernelcal.CANDIDATES, (3.0, 2.0, 1.0), strict=True)}
    calls = []
    plan = kernelcal.plan([A, A], timer=fake_timer(table, calls))
    assert plan.gemm == {A: True} and len(calls) == 6
    path = kernelcal.cache_file()
    doc = json.loads(path.read_text())
    assert doc["machine"] == kernelcal.machine() and doc["times"] == {"2,8,4,4,16,1,1,0": {"nchw": 3.0, "cl": 2.0,
                                                                                          "gemm": 1.0}}
    calls.clear()
    kernelcal.plan([A, B], timer=fake_timer(table, calls))
    assert {key for _, key in calls} == {B}  # A came from the cache
    # Another thread count is another machine: its own file.
    other = dict(kernelcal.machine(), threads=kernelcal.machine()["threads"] + 1)
    assert kernelcal.cache_file(other) != path


@pytest.mark.parametrize("content", [
    "{not json", '{"format": 1, "machine": {}, "times": {}}', "[1, 2]",
    '{"format": 1, "machine": MACHINE, "times": {"1,2,3": {"nchw": 1, "cl": 1, "gemm": 1}}}',
    '{"format": 1, "machine": MACHINE, "times": {"2,8,4,4,16,1,1,0": {"nchw": -1, "cl": 1, "gemm": 1}}}',
    '{"format": 1, "machine": MACHINE, "times": {"2,8,4,4,16,1,1,0": {"nchw": "__import__", "cl": 1, "gemm": 1}}}',
])
def test_damaged_cache_is_ignored_with_a_warning_and_rewritten(tmp_path, monkeypatch, content):
    monkeypatch.setenv("BIGTRANSFER_CACHE", str(tmp_path))
    path = kernelcal.cache_file()
    path.parent.mkdir(parents=True)
    path.write_text(content.replace("MACHINE", json.dumps(kernelcal.machine())))
    table = {(c, A): 1.0 for c in kernelcal.CANDIDATES}
    calls = []
    with pytest.warns(UserWarning, match="ignoring the kernel calibration cache"):
        kernelcal.plan([A], timer=fake_timer(table, calls))
    assert len(calls) == 6
    assert json.loads(path.read_text())["format"] == kernelcal.FORMAT  # replaced by a good one


def test_unwritable_cache_only_warns(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("BIGTRANSFER_CACHE", str(blocker))  # a file where the folder should be
    table = {(c, A): 1.0 for c in kernelcal.CANDIDATES}
    with pytest.warns(UserWarning, match="cannot write"):
        assert kernelcal.plan([A], timer=fake_timer(table)).channels_last


def _timer_preferring(prefer: str) -> kernelcal.Timer:
    return lambda fn, label: 1.0 if label[0] == prefer else 2.0


def _calibrating_model(tmp_path, monkeypatch) -> tuple[ResNetV2, torch.Tensor]:
    """Calibration on, a cache of the test's own, and a small model with a non-zero head and an input for it."""
    monkeypatch.setenv("BIGTRANSFER_CALIBRATE", "1")
    monkeypatch.setenv("BIGTRANSFER_CACHE", str(tmp_path))
    torch.manual_seed(0)
    return ResNetV2("R14x0.5", 10, zero_head=False).eval(), torch.rand(2, 3, 32, 32) * 2 - 1


def test_prepare_for_inference_uses_the_calibration(tmp_path, monkeypatch):
    model, x = _calibrating_model(tmp_path, monkeypatch)
    with torch.no_grad():
        ref = model(x)
    gemm_calls = []
    real_gemm = gemmconv.gemm_conv2d
    monkeypatch.setattr(gemmconv, "gemm_conv2d", lambda *a: gemm_calls.append(1) or real_gemm(*a))
    for prefer, channels_last, gemms in (("gemm", True, True), ("nchw", False, False), ("cl", True, False)):
        monkeypatch.setattr(kernelcal, "wall_time", _timer_preferring(prefer))
        kernelcal.cache_file().unlink(missing_ok=True)
        fast = prepare_for_inference(model)
        fast(x)  # calibrates: one recording pass under the rule, then the plan
        gemm_calls.clear()
        out = fast(x)
        assert fast.channels_last == channels_last
        assert fast.frozen.stages[0][0].conv2.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert bool(gemm_calls) == gemms
        assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-4
    # A chosen layout is kept: calibration then only decides GEMM or not on it.
    monkeypatch.setattr(kernelcal, "wall_time", _timer_preferring("nchw"))
    kernelcal.cache_file().unlink()
    assert prepare_for_inference(model, channels_last=True)(x).shape == (2, 10)


def test_env_var_turns_calibration_off(monkeypatch):
    monkeypatch.setenv("BIGTRANSFER_CALIBRATE", "0")
    monkeypatch.setattr(kernelcal, "plan", lambda *a, **k: pytest.fail("calibrated although turned off"))
    monkeypatch.setattr(kernelcal, "norm_plan", lambda *a, **k: pytest.fail("calibrated although turned off"))
    fast = prepare_for_inference(ResNetV2("R14x0.5", 10).eval())
    fast(torch.rand(1, 3, 32, 32))
    assert fast.channels_last  # the deterministic rule: channels-last, GEMM_MAX_POSITIONS


def test_training_evaluations_never_depend_on_timings(monkeypatch):
    """A run's logged evaluations use the shape rule, so a resumed run logs exactly what a straight one does."""
    from bigtransfer.transfer.finetune import evaluate

    monkeypatch.setenv("BIGTRANSFER_CALIBRATE", "1")
    monkeypatch.setattr(kernelcal, "plan", lambda *a, **k: pytest.fail("a training run's evaluation calibrated"))
    model = ResNetV2("R14x0.5", 3)
    result = evaluate(model, [(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))], 3)
    assert result["examples"] == 2
    assert not prepare_for_inference(model, calibrate=False).calibrate
    assert prepare_for_inference(model).calibrate  # the env var allows it, and nothing said otherwise


# ---------------------------------------------------------------- training: forward + backward, kept by the run

def test_measure_with_backward_times_forward_and_backward_of_the_channels_last_candidates():
    seen = []

    def timer(fn, label):
        grads = fn()  # runs the candidate: forward and backward, the gradients of input and kernel
        seen.append(label)
        assert len(grads) == 2 and grads[0].shape == (2, 8, 4, 4) and grads[1].shape == (16, 8, 1, 1)
        return 1.0

    # NCHW is not timed: training keeps its channels-last layout, so only oneDNN there and the GEMM compete.
    assert kernelcal.measure(A, timer, backward=True) == {"nchw": None, "cl": 1.0, "gemm": 1.0}
    assert [c for c, _ in seen] == ["cl", "gemm", "gemm", "cl"]
    # Such times never choose NCHW, even offered.
    assert kernelcal.choose({A: 1}, {A: {"nchw": None, "cl": 2.0, "gemm": 1.0}}).channels_last
    assert kernelcal.cache_file(backward=True) != kernelcal.cache_file()  # forward-only times are another file


def _train_step_gemm_calls(monkeypatch, kernels):
    from bigtransfer.transfer.finetune import train_step

    calls = []
    real_gemm = gemmconv.gemm_conv2d
    monkeypatch.setattr(gemmconv, "gemm_conv2d", lambda *a: calls.append(1) or real_gemm(*a))
    torch.manual_seed(0)
    model = ResNetV2("R14x0.5", 3).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    train_step(model, opt, [(x, y)], batch=4, lr=0.1, kernels=kernels)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    calls.clear()
    train_step(model, opt, [(x, y)], batch=4, lr=0.1, kernels=kernels)  # lr 0: the same weights, the same step
    return len(calls), grads


def test_training_steps_follow_the_forward_backward_measurement_and_the_run_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGTRANSFER_CALIBRATE", "1")
    monkeypatch.setenv("BIGTRANSFER_CACHE", str(tmp_path / "cache"))
    rule, rule_grads = _train_step_gemm_calls(monkeypatch, None)
    assert rule > 0  # at 64 px R14x0.5's smaller maps go to the GEMM by the shape rule, the 16x16 3x3s do not
    run = tmp_path / "kernels.json"
    none, grads = _train_step_gemm_calls(monkeypatch, kernelcal.TrainingKernels(run, keep=False,
                                                                                   timer=_timer_preferring("cl")))
    assert none == 0  # every layer measured slower as a GEMM: all on oneDNN, even where the rule said GEMM
    for name, g in grads.items():  # the same gradients, another kernel (float32 rounding apart)
        assert torch.allclose(g, rule_grads[name], rtol=1e-4, atol=1e-6), name
    saved = json.loads(run.read_text())["plans"]
    assert [p["input"] for p in saved] == [[4, 3, 64, 64]] and all(c[8] == 0 for c in saved[0]["convs"])
    # Resumed (keep): the run's own choices, whatever the timer or the machine's cache now say.
    never = lambda fn, label: pytest.fail("a resumed run measured again")  # noqa: E731
    assert _train_step_gemm_calls(monkeypatch, kernelcal.TrainingKernels(run, timer=never))[0] == 0
    # A new run in the folder (keep=False) measures afresh: the machine's cache answers now (all GEMM-able on GEMM).
    kernelcal.cache_file(backward=True).unlink()
    fresh = kernelcal.TrainingKernels(run, keep=False, timer=_timer_preferring("gemm"))
    assert _train_step_gemm_calls(monkeypatch, fresh)[0] > rule  # every layer the GEMM computes, more than the rule
    assert any(c[8] == 1 for c in json.loads(run.read_text())["plans"][0]["convs"])


def test_training_kernels_stay_out_of_the_way_where_there_is_no_choice(tmp_path, monkeypatch):
    never = lambda fn, label: pytest.fail("measured")  # noqa: E731
    model = ResNetV2("R14x0.5", 3).to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 32, 32)
    monkeypatch.setenv("BIGTRANSFER_CALIBRATE", "0")
    assert kernelcal.TrainingKernels(None, timer=never).for_input(model, x) == kernelcal.RULE  # turned off
    monkeypatch.setenv("BIGTRANSFER_CALIBRATE", "1")
    assert kernelcal.TrainingKernels(None, timer=never).for_input(ResNetV2("R14x0.5", 3), x) == kernelcal.RULE  # NCHW
    # The loop said so:
    assert kernelcal.TrainingKernels(None, timer=never, measure=False).for_input(model, x) == kernelcal.RULE
    for bad in ('{"plans": [{"input": [2, 3], "convs": [[1, 2]]}]}', "{not json",
                '{"plans": [{"input": [2, 3, 8, 8], "convs": [[2, 8, 4, 4, 16, 1, 1, 0, "no"]]}]}',
                '{"plans": [{"input": [2, 3, 8, 8], "convs": [[2, 8, 4, 4, 16, 1, 1, 0, 2]]}]}'):
        (tmp_path / "kernels.json").write_text(bad)
        with pytest.raises(UserError, match=r"kernels.json: not a kernel choice file of a run"):
            kernelcal.TrainingKernels(tmp_path / "kernels.json")


def test_a_resumed_run_follows_its_file_not_the_environment(tmp_path, monkeypatch):
    never = lambda fn, label: pytest.fail("measured")  # noqa: E731
    model = ResNetV2("R14x0.5", 3).to(memory_format=torch.channels_last)
    x, run = torch.rand(2, 3, 32, 32), tmp_path / "kernels.json"
    monkeypatch.setenv("BIGTRANSFER_CALIBRATE", "0")  # a run started with measuring off records the rule
    assert kernelcal.TrainingKernels(run, keep=False, timer=never).for_input(model, x) == kernelcal.RULE
    assert json.loads(run.read_text()) == {"format": 2, "plans": [{"input": [2, 3, 32, 32], "convs": None,
                                                                     "norms": []}]}
    monkeypatch.setenv("BIGTRANSFER_CALIBRATE", "1")  # resumed with measuring on: still the rule, as it trained
    assert kernelcal.TrainingKernels(run, keep=True, timer=never).for_input(model, x) == kernelcal.RULE
    run.unlink()  # a run saved before kernels.json existed trained by the rule: it keeps it
    assert kernelcal.TrainingKernels(run, keep=True, timer=never).for_input(model, x) == kernelcal.RULE


# ---------------------------------------------------------------- GroupNorm: its channels-last kernel or an NCHW copy

N1 = (2, 64, 4, 4, 32)  # 2 channels per group
N2 = (2, 128, 8, 8, 32)


def test_norm_plan_follows_the_timer_and_caches_per_dtype(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGTRANSFER_CACHE", str(tmp_path))
    table = {("cl", N1): 2.0, ("nchw", N1): 1.0, ("cl", N2): 1.0, ("nchw", N2): 3.0}
    calls: list = []
    assert kernelcal.norm_plan([N1, N2, N1], torch.bfloat16, fake_timer(table, calls)) == {N1}
    assert sorted(calls) == sorted([*table, *table])  # each shape timed twice both ways (two rounds)
    never = fake_timer({})  # a KeyError if asked: the cache answers
    assert kernelcal.norm_plan([N2, N1], torch.bfloat16, never) == {N1}
    assert kernelcal.norm_plan([N2], torch.bfloat16, never) == frozenset()
    calls.clear()
    assert kernelcal.norm_plan([N1], torch.float32, fake_timer(table, calls)) == {N1}
    assert calls  # another dtype, another file
    names = sorted(p.name.split("-")[1] for p in (tmp_path / "kernels").glob("norm-*.json"))
    assert names == ["bfloat16", "float32"]


@pytest.mark.parametrize("content", ["{", "[" * 100000, json.dumps({"format": 1, "machine": {}, "times": {}}),
                                     "CONV", "FLOAT32"])
def test_damaged_norm_cache_is_ignored_with_a_warning_and_rewritten(tmp_path, monkeypatch, content):
    monkeypatch.setenv("BIGTRANSFER_CACHE", str(tmp_path))
    path = kernelcal.cache_file({**kernelcal.machine(), "dtype": "bfloat16"}, kind="norm-bfloat16")
    path.parent.mkdir(parents=True, exist_ok=True)
    if content == "CONV":  # a valid convolution cache is not a GroupNorm cache (keys of 8 numbers, 3 candidates)
        content = json.dumps({"format": 1, "machine": kernelcal.machine(), "times": {"2,8,4,4,16,1,1,0":
                                                                                     {"nchw": 1, "cl": 1, "gemm": 1}}})
    if content == "FLOAT32":  # another dtype's valid file under this dtype's name
        kernelcal.norm_plan([N1], torch.float32, fake_timer({("cl", N1): 1.0, ("nchw", N1): 2.0}))
        content = kernelcal.cache_file({**kernelcal.machine(), "dtype": "float32"}, kind="norm-float32").read_text()
        path = kernelcal.cache_file({**kernelcal.machine(), "dtype": "bfloat16"}, kind="norm-bfloat16")
    path.write_text(content)
    table = {("cl", N1): 2.0, ("nchw", N1): 1.0}
    with pytest.warns(UserWarning, match="ignoring the kernel calibration cache"):
        assert kernelcal.norm_plan([N1], torch.bfloat16, fake_timer(table)) == {N1}
    assert kernelcal.norm_plan([N1], torch.bfloat16, fake_timer({})) == {N1}  # rewritten, readable


def test_measure_norm_times_both_ways_on_real_data():
    outs = {}

    def timer(fn, label):
        outs[label[0]] = fn()
        return {"cl": 1.0, "nchw": 2.0}[label[0]]

    assert kernelcal.measure_norm(N1, torch.float32, timer) == {"cl": 1.0, "nchw": 2.0}
    rounds = iter([3.0, 2.0, 1.0, 4.0])  # cl, nchw, then nchw, cl: each way's best of its two
    assert kernelcal.measure_norm(N1, torch.float32, lambda fn, label: next(rounds)) == {"cl": 3.0, "nchw": 1.0}
    assert outs["cl"].shape == outs["nchw"].shape == N1[:4]
    assert outs["cl"].is_contiguous(memory_format=torch.channels_last)
    assert outs["nchw"].is_contiguous(memory_format=torch.channels_last)  # the copy comes back channels-last
    assert torch.allclose(outs["cl"], outs["nchw"], atol=1e-5)  # the same GroupNorm either way


def test_a_near_tie_keeps_the_channels_last_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGTRANSFER_CACHE", str(tmp_path))
    table = {("cl", N1): 1.0, ("nchw", N1): 0.95, ("cl", N2): 1.0, ("nchw", N2): 0.85}
    assert kernelcal.norm_plan([N1, N2], torch.bfloat16, fake_timer(table)) == {N2}


def test_norm_plan_takes_any_iterable(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGTRANSFER_CACHE", str(tmp_path))
    table = {("cl", N1): 2.0, ("nchw", N1): 1.0}
    assert kernelcal.norm_plan((k for k in [N1, N1]), torch.bfloat16, fake_timer(table)) == {N1}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_layout_group_norm_is_group_norm_either_way(dtype, tol, monkeypatch):
    via_nchw = []
    real = normlayout.group_norm_via_nchw
    monkeypatch.setattr(normlayout, "group_norm_via_nchw", lambda *a: via_nchw.append(1) or real(*a))
    torch.manual_seed(0)
    plain = torch.nn.GroupNorm(32, 128).to(dtype)
    torch.nn.init.normal_(plain.weight)
    torch.nn.init.normal_(plain.bias)
    norm = copy.deepcopy(plain)
    norm.__class__ = normlayout.LayoutGroupNorm  # as frozen_copy makes it
    x = torch.randn(2, 128, 8, 8).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = torch.nn.functional.group_norm(x.float().contiguous(), 32, plain.weight.float(), plain.bias.float())
        assert torch.equal(norm(x), plain(x))  # outside norm_layouts: exactly nn.GroupNorm
        with normlayout.recording_norms() as seen, normlayout.norm_layouts(frozenset({N2})):
            out = norm(x)
            assert torch.equal(norm(x.contiguous()), plain(x.contiguous()))  # NCHW maps: not dispatched
        with normlayout.norm_layouts(frozenset({N2})):  # off the CPU (here: meta tensors) no choice applies
            assert norm.to("meta")(x.to("meta")).device.type == "meta"
    assert seen == [N2] and via_nchw == [1]  # only the channels-last CPU call in the chosen set took the NCHW copy
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert (out.float() - ref).abs().max().item() < tol * ref.abs().max().item()


def test_prepare_for_inference_runs_each_group_norm_as_measured(tmp_path, monkeypatch):
    model, x = _calibrating_model(tmp_path, monkeypatch)
    via_nchw = []
    real = normlayout.group_norm_via_nchw
    monkeypatch.setattr(normlayout, "group_norm_via_nchw", lambda *a: via_nchw.append(a[0].shape) or real(*a))
    outs = {}
    for prefer in ("cl", "nchw"):
        # Norm labels carry 5-number keys, convolution labels 8: only the GroupNorm choice changes.
        monkeypatch.setattr(kernelcal, "wall_time", lambda fn, label, p=prefer: (
            1.0 if label[0] == p else 2.0) if len(label[1]) == 5 else (1.0 if label[0] == "cl" else 2.0))
        for path in (tmp_path / "kernels").glob("norm-*.json"):
            path.unlink()
        with pytest.warns(RuntimeWarning) if not _bf16_units() else contextlib.nullcontext():
            fast = prepare_for_inference(model, "bf16")
        fast(x)  # calibrates
        via_nchw.clear()
        with normlayout.recording_norms() as seen:
            outs[prefer] = fast(x)
        assert len(seen) >= 8  # the GroupNorms on channels-last maps (1x1 maps are not)
        always = sum(getattr(m, "always_nchw", False) for m in model.modules())  # the first unit's gn1: precision
        assert always == 1 and len(via_nchw) == always + (0 if prefer == "cl" else len(seen)), (via_nchw, seen)
    ref = model(x)
    for out in outs.values():
        assert ((out - ref).abs().max() / ref.abs().max()).item() < 5e-2  # bf16
    assert ((outs["cl"] - outs["nchw"]).abs().max() / ref.abs().max()).item() < 5e-2


def _bf16_units() -> bool:
    from bigtransfer.deploy.inference_model import native_precision

    return native_precision("bf16", torch.device("cpu"))



def test_frozen_copy_keeps_group_norm_hooks_and_refresh_keeps_the_dispatch():
    from bigtransfer.deploy.inference_model import frozen_copy

    model = ResNetV2("R14x0.5", 10).eval()
    calls = []
    model.norm.register_forward_hook(lambda m, i, o: calls.append(1))
    frozen = frozen_copy(model)
    assert type(frozen.norm) is normlayout.LayoutGroupNorm  # as every model is built
    assert list(frozen.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        frozen(torch.rand(1, 3, 32, 32))
    assert calls == [1]
    fast = prepare_for_inference(model, calibrate=False)
    with torch.no_grad():
        model.head.weight.add_(1.0)  # a weight change: the next call refreshes the copy
    fast(torch.rand(1, 3, 32, 32))
    assert isinstance(fast.frozen.norm, normlayout.LayoutGroupNorm)


def test_an_fp32_model_calibrated_to_nchw_times_no_group_norm(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGTRANSFER_CALIBRATE", "1")
    monkeypatch.setenv("BIGTRANSFER_CACHE", str(tmp_path))
    monkeypatch.setattr(kernelcal, "wall_time", _timer_preferring("nchw"))
    monkeypatch.setattr(kernelcal, "norm_plan", lambda *a, **k: pytest.fail("GroupNorms timed on an NCHW model"))
    fast = prepare_for_inference(ResNetV2("R14x0.5", 10).eval())
    fast(torch.rand(2, 3, 32, 32))
    assert not fast.channels_last


def test_first_calls_from_several_threads_calibrate_once(tmp_path, monkeypatch):
    import threading
    import time

    monkeypatch.setenv("BIGTRANSFER_CALIBRATE", "1")
    monkeypatch.setenv("BIGTRANSFER_CACHE", str(tmp_path))
    plans = []
    real = kernelcal.plan

    def slow_plan(*a, **k):  # a wide window for a second thread to start calibrating too
        plans.append(1)
        time.sleep(0.2)
        return real(*a, **k)

    monkeypatch.setattr(kernelcal, "plan", slow_plan)
    monkeypatch.setattr(kernelcal, "wall_time", _timer_preferring("nchw"))  # the first plan switches the layout
    torch.manual_seed(0)
    model = ResNetV2("R14x0.5", 10, zero_head=False).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = model(x)
    fast = prepare_for_inference(model)
    outs, errors = [], []

    def call():
        try:
            outs.append(fast(x))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(outs) == 4 and plans == [1] and not fast.channels_last
    for out in outs:
        assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-4


def _train_step_norm_copies(monkeypatch, kernels, precision: str = "fp32", checkpointing: bool = False):
    """GroupNorms through an NCHW copy, and the gradients, of one training step of a fixed tiny model."""
    from bigtransfer.engine.step import accumulate_and_step

    copies = []
    real = normlayout.group_norm_via_nchw
    monkeypatch.setattr(normlayout, "group_norm_via_nchw", lambda *a: copies.append(a[0].shape) or real(*a))
    torch.manual_seed(0)
    model = ResNetV2("R14x0.5", 3, zero_head=False).to(memory_format=torch.channels_last)
    model.set_grad_checkpointing(checkpointing)
    model.stages[0][0].gn1.always_nchw = False  # counted here: the copies the measurement chose, not precision's
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 2])
    accumulate_and_step(model, opt, [(x, y)], lambda out, t: torch.nn.functional.cross_entropy(out.float(), t),
                        device=torch.device("cpu"), precision=precision, kernels=kernels)
    return len(copies), {n: p.grad.clone() for n, p in model.named_parameters()}


def _norm_timer_preferring(prefer: str) -> kernelcal.Timer:
    """GroupNorm labels (5-number keys) follow `prefer`; convolutions keep oneDNN."""
    return lambda fn, label: (1.0 if label[0] == prefer else 2.0) if len(label[1]) == 5 else (
        1.0 if label[0] == "cl" else 2.0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_group_norms_follow_the_forward_backward_measurement_and_the_run_keeps_it(tmp_path, monkeypatch,
                                                                                           precision):
    monkeypatch.setenv("BIGTRANSFER_CALIBRATE", "1")
    monkeypatch.setenv("BIGTRANSFER_CACHE", str(tmp_path / "cache"))
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    run = tmp_path / "kernels.json"
    labels = []

    def timer(fn, label):
        labels.append(label)
        return _norm_timer_preferring("nchw")(fn, label)

    copies, grads = _train_step_norm_copies(monkeypatch, kernelcal.TrainingKernels(run, keep=False, timer=timer,
                                                                                    dtype=dtype), precision)
    assert copies > 0 and any(len(key) == 5 for _, key in labels)
    assert list((tmp_path / "cache" / "kernels").glob(f"norm-{str(dtype)[6:]}-train-*.json"))  # timed in its dtype
    assert any(len(key) == 8 for _, key in labels) == (precision == "fp32")  # convolutions timed in fp32 runs only
    saved = json.loads(run.read_text())["plans"][0]
    assert saved["norms"] and all(len(k) == 5 for k in saved["norms"])
    assert (saved["convs"] is None) == (precision == "bf16")
    none, rule_grads = _train_step_norm_copies(monkeypatch, None, precision)
    assert none == 0
    tol = 1e-4 if precision == "fp32" else 5e-2
    for name, g in rule_grads.items():  # the same step either way, up to rounding
        assert (grads[name] - g).abs().max().item() <= tol * max(g.abs().max().item(), 1e-3), name
    # Activation checkpointing recomputes the forward pass inside the same choices: twice the copies, same step.
    twice, ckpt_grads = _train_step_norm_copies(monkeypatch, kernelcal.TrainingKernels(run, dtype=dtype), precision,
                                                checkpointing=True)
    assert twice == 2 * copies
    assert all(torch.equal(ckpt_grads[n], g) for n, g in grads.items())
    # Resumed: the run's own choices, whatever the timer or the machine's cache now say.
    never = lambda fn, label: pytest.fail("measured")  # noqa: E731
    assert _train_step_norm_copies(monkeypatch, kernelcal.TrainingKernels(run, timer=never, dtype=dtype),
                                   precision)[0] == copies
    monkeypatch.setenv("BIGTRANSFER_CACHE", str(tmp_path / "another-machine"))  # a fresh run where the copy loses
    fresh = kernelcal.TrainingKernels(tmp_path / "other.json", keep=False, timer=_norm_timer_preferring("cl"),
                                      dtype=dtype)
    assert _train_step_norm_copies(monkeypatch, fresh, precision)[0] == 0


def test_a_kernel_file_saved_before_group_norm_choices_keeps_channels_last_group_norms(tmp_path):
    run = tmp_path / "kernels.json"
    run.write_text(json.dumps({"plans": [{"input": [2, 3, 32, 32], "convs": None}]}))
    kernels = kernelcal.TrainingKernels(run, timer=lambda fn, label: pytest.fail("measured"))
    model = ResNetV2("R14x0.5", 3).to(memory_format=torch.channels_last)
    assert kernels.for_input(model, torch.rand(2, 3, 32, 32)) == kernelcal.RULE
    run.write_text(json.dumps({"plans": [{"input": [2, 3, 32, 32], "convs": None, "norms": [[2, 64]]}]}))
    with pytest.raises(UserError, match="not a kernel choice file of a run"):
        kernelcal.TrainingKernels(run)


@pytest.mark.parametrize("written", [3, "2", True])
def test_a_kernel_file_of_an_unknown_format_is_refused_not_half_read(tmp_path, written):
    run = tmp_path / "kernels.json"
    run.write_text(json.dumps({"format": written, "plans": [{"input": [2, 3, 32, 32], "convs": None, "norms": []}]}))
    with pytest.raises(UserError, match=r"kernels.json: kernel choice format .* which this version does not know"):
        kernelcal.TrainingKernels(run)
    run.write_text(json.dumps([1, 2]))  # not even an object
    with pytest.raises(UserError, match="not a kernel choice file of a run"):
        kernelcal.TrainingKernels(run)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_a_process_forked_during_a_calibration_can_calibrate():
    """The calibration lock held by another thread at the fork must not be held in the child, which lacks that
    thread: its first call of a new shape would wait forever."""
    from bigtransfer.deploy import inference_model

    with inference_model._CALIBRATION:  # as if another thread were calibrating right now
        pid = os.fork()
        if pid == 0:  # the child: exit status 0 only if it can take the lock
            os._exit(0 if inference_model._CALIBRATION.acquire(timeout=2) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
