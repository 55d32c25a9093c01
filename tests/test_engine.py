"""The shared run engine: the one resume rule (engine/rundir.py), the one update and evaluation pass (engine/step.py)
and the one progress display (engine/progress.py), checked against hand-written references."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from bigtransfer.engine.progress import Progress
from bigtransfer.engine.rundir import RunDir, RunDirError, changed_settings, must_match, saved_settings
from bigtransfer.engine.step import accumulate_and_step, evaluation_pass
from bigtransfer.model.resnetv2 import ResNetV2
from bigtransfer.transfer.finetune import FinetuneConfig, mixup_permutation, train_step
from bigtransfer.upstream.pretrain import PretrainConfig, pretrain_loss

CPU = torch.device("cpu")


def _model(seed: int = 0) -> ResNetV2:
    torch.manual_seed(seed)
    model = ResNetV2("R14x0.5", 3)
    torch.nn.init.normal_(model.head.weight, std=0.05)  # not zero: the whole network gets gradients
    return model.train()


def _batches(steps: int, n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 3, 32, 32, generator=g), torch.randint(3, (n,), generator=g)) for _ in range(steps)]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------- one update, bit for bit

def test_finetune_update_equals_the_written_out_formula():
    """train_step (through accumulate_and_step) against the fine-tuning update spelled out: MixUp within each
    micro-batch, summed cross-entropy / global batch, backward per micro-batch, one SGD step: identical weights."""
    lam = 0.7
    ours, ref = _model(), _model()
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.0, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.0, momentum=0.9)
    for step, (x, y) in enumerate(_batches(3)):
        micro = [(x[:4], y[:4]), (x[4:], y[4:])]
        loss = train_step(ours, opt_ours, micro, batch=8, lr=0.1, lam=lam, seed=3, step=step)
        opt_ref.zero_grad(set_to_none=True)
        total = 0.0
        for q, (xs, ys) in enumerate(micro):
            perm = mixup_permutation(4, 3, step, q)
            logits = ref(lam * xs + (1 - lam) * xs[perm])
            part = (lam * F.cross_entropy(logits, ys, reduction="sum")
                    + (1 - lam) * F.cross_entropy(logits, ys[perm], reduction="sum")) / 8
            part.backward()
            total += float(part.detach())
        for group in opt_ref.param_groups:
            group["lr"] = 0.1
        opt_ref.step()
        assert loss == total
    _same_weights(ours, ref)


def test_pretrain_update_equals_the_written_out_formula():
    """The pre-training update: each micro-batch's mean loss / batch_split, backward, one step: identical weights."""
    ours, ref = _model(), _model()
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for x, y in _batches(3):
        targets = F.one_hot(y, 3).float()
        micro = [(x[:4], targets[:4]), (x[4:], targets[4:])]
        losses = accumulate_and_step(ours, opt_ours, iter(micro), lambda logits, t: pretrain_loss(logits, t, "sigmoid"),
                                     device=CPU, divisor=2)
        opt_ref.zero_grad(set_to_none=True)
        expected = []
        for xs, ts in micro:
            loss = F.binary_cross_entropy_with_logits(ref(xs), ts, reduction="none").sum(dim=1).mean()
            (loss / 2).backward()
            expected.append(float(loss.detach()))
        opt_ref.step()
        assert [float(v) for v, _ in losses] == expected and [n for _, n in losses] == [4, 4]
    _same_weights(ours, ref)


def test_update_sets_lr_syncs_each_micro_batch_and_clips():
    model = torch.nn.Linear(4, 1, bias=False)
    torch.nn.init.constant_(model.weight, 1.0)
    opt = torch.optim.SGD(model.parameters(), lr=123.0)
    entered = []

    class Sync:
        def __init__(self, q):
            self.q = q

        def __enter__(self):
            entered.append(self.q)

        def __exit__(self, *exc):
            return False

    x = torch.ones(3, 4)
    accumulate_and_step(model, opt, [(x, None), (x, None)], lambda out, _: out.sum(), device=CPU, lr=1.0,
                        sync=Sync, clip_norm=0.5)
    assert entered == [0, 1] and opt.param_groups[0]["lr"] == 1.0
    # The gradient is 6 per weight (2 micro-batches x 3 rows); clipped to norm 0.5 it is 0.25 per weight, and an
    # SGD step at lr 1 without momentum moves each weight by exactly that.
    torch.testing.assert_close(model.weight, torch.full((1, 4), 0.75))


def test_evaluation_pass_runs_without_gradients_in_eval_mode_and_restores_the_mode():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    seen = []

    def consume(logits, target):
        seen.append((logits.requires_grad, model.training, target))

    evaluation_pass(model, [(torch.ones(1, 2), "a"), (torch.ones(1, 2), "b")], consume, device=CPU)
    assert seen == [(False, False, "a"), (False, False, "b")] and model.training


# ---------------------------------------------------------------- the one resume rule

def test_each_config_declares_what_may_change_and_the_rest_must_match():
    # What fine-tuning listed as SETTINGS_THAT_MATTER before the rule was turned around (hand-copied).
    before = {"data", "model", "weights", "examples_per_class", "seed", "steps", "batch", "resolution", "flip",
              "crop", "variant", "base_lr", "val_fraction", "precision", "split_seed", "mixup_alpha"}
    assert set(must_match(FinetuneConfig)) == before
    for config in (FinetuneConfig, PretrainConfig):
        names = {f.name for f in dataclasses.fields(config)}
        assert config.RESUMABLE_CHANGES <= names, config.RESUMABLE_CHANGES - names
    assert {"lr", "seed", "loss", "batch", "model", "data"} <= set(must_match(PretrainConfig))


def test_changed_settings_names_each_difference_and_skips_what_the_old_run_does_not_record():
    saved = {"seed": 0, "resolution": [36, 32], "workers": 2, "out": "/a"}
    new = {"seed": 1, "resolution": (36, 32), "workers": 4, "out": "/b", "added_later": 5}
    assert changed_settings(saved, new, {"workers", "out"}) == ["--seed was 0, now 1"]
    assert changed_settings(saved, {**new, "seed": 0}, {"workers", "out"}) == []
    assert changed_settings(saved, new, set()) == ["--seed was 0, now 1", "--workers was 2, now 4",
                                                   "--out was '/a', now '/b'"]


def test_saved_settings_reads_both_layouts_and_refuses_garbage(tmp_path):
    finetune = tmp_path / "f.json"
    finetune.write_text(json.dumps({"settings": {"seed": 3}, "plan": {"end": 4}}))
    pretrain = tmp_path / "p.json"
    pretrain.write_text(json.dumps({"seed": 3, "lr": 0.1, "plan": {"steps": 4}}))
    assert saved_settings(finetune) == {"seed": 3}
    assert saved_settings(pretrain) == {"seed": 3, "lr": 0.1}
    for bad in ("[1, 2]", "{not json", json.dumps({"settings": [1]})):
        finetune.write_text(bad)
        with pytest.raises(RunDirError, match="f.json: unreadable"):
            saved_settings(finetune)


def test_resume_point(tmp_path):
    run = RunDir(tmp_path / "run", files=("config.json", "state.pt", "summary.json"))
    settings, may = {"seed": 0, "workers": 1}, {"workers"}
    assert run.resume_point(settings, may) is False  # no folder
    run.path.mkdir()
    (run.path / "notes.txt").write_text("x")
    with pytest.raises(RunDirError, match="not a bigtransfer run directory"):
        run.resume_point(settings, may)
    (run.path / "notes.txt").unlink()
    run.write_config({"settings": settings})
    assert run.resume_point(settings, may) is False  # a run that saved nothing: start it again
    run.state_file.write_bytes(b"")
    assert run.resume_point({**settings, "workers": 8}, may) is True
    assert run.resume_point({**settings, "seed": 2}, may, overwrite=True) is False
    assert not run.state_file.exists() and not run.config_file.exists()
    run.write_config({"settings": settings})
    (run.path / "summary.json").write_text("{}")
    with pytest.raises(RunDirError, match=r"--seed was 0, now 2.*--overwrite"):
        run.resume_point({**settings, "seed": 2}, may)


# ---------------------------------------------------------------- the one progress display

def test_progress_lines_bar_and_nothing(capsys):
    lines = Progress("lines")
    lines.start(40)
    for done in range(1, 41):
        lines.step(done, {"loss": "1"}, f"step {done}")
    lines.say("hello")
    out = capsys.readouterr().out.splitlines()
    assert out == [f"step {d}" for d in range(2, 41, 2)] + ["hello"]
    quiet = Progress("nothing")
    quiet.start(3)
    quiet.step(3, line="x")
    quiet.say("y")
    assert capsys.readouterr() == ("", "")
    bar = Progress("bar", desc="testing")
    bar.start(2)
    bar.say("above")
    bar.step(1, {"loss": "0.5"})
    bar.close()
    captured = capsys.readouterr()
    assert "above" in captured.out and "testing" in captured.err and "loss=0.5" in captured.err
    with pytest.raises(ValueError, match="show must be one of"):
        Progress("loud")
