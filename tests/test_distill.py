"""Distillation: the recipe's invariants (consistent views, KL, resume) and its refusals, on tiny models."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bigtransfer.transfer.distill as distill
from bigtransfer import read_checkpoint, save_checkpoint
from bigtransfer.cli import main
from bigtransfer.core.errors import UserError
from bigtransfer.data.pretraining import random_resized_crop_box
from bigtransfer.engine.metrics import read_jsonl
from bigtransfer.engine.rundir import RunDirError
from bigtransfer.model.checkpoints import CheckpointError
from bigtransfer.model.resnetv2 import ResNetV2
from bigtransfer.transfer.distill import ConsistentViews, DistillConfig, distill_loss, run_distill

from .bit_reference import random_authors_arrays
from .test_finetune import CLASSES, make_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("colours"), per_class=6)


def write_teacher(path: Path, classes: int = 3, seed: int = 0, labels=CLASSES) -> Path:
    """A teacher with random weights and a random (not zero) head, so its outputs differ between images."""
    torch.manual_seed(seed)
    model = ResNetV2("R26x0.5", classes)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    model.labels = list(labels) if labels is not None else None
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return write_teacher(tmp_path_factory.mktemp("teacher") / "teacher.safetensors")


def tiny(data: Path, out: Path, teacher: Path, **kw) -> DistillConfig:
    settings = dict(student="R14x0.5", steps=4, batch=4, resolution=32, workers=0, silent=True, lr=0.01)
    settings.update(kw)
    return DistillConfig(data=str(data), out=str(out), teacher=str(teacher), **settings)


def test_lr_schedules_by_hand():
    c = DistillConfig(data=".", out="x", teacher="t", steps=100, lr=0.5, warmup=10)
    assert [distill.lr_at(c, s) for s in (0, 5, 10)] == [0.0, 0.25, 0.5]
    assert distill.lr_at(c, 55) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert distill.lr_at(c, 99) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    steps = DistillConfig(data=".", out="x", teacher="t", steps=100, lr=0.5, warmup=10, schedule="steps")
    assert [distill.lr_at(steps, s) for s in (30, 31, 61, 91)] == pytest.approx([0.5, 0.05, 0.005, 0.0005])
    assert DistillConfig(data=".", out="x", teacher="t", steps=100).warmup_steps == 5  # 5% by default


def test_kl_loss_equals_a_hand_computation():
    rng = np.random.default_rng(0)
    s, t = rng.normal(0, 2, (5, 7)), rng.normal(0, 2, (5, 7))
    for temp in (1.0, 3.0):
        p = np.exp(t / temp) / np.exp(t / temp).sum(1, keepdims=True)
        q = np.exp(s / temp) / np.exp(s / temp).sum(1, keepdims=True)
        hand = (p * np.log(p / q)).sum(1)
        got = distill_loss(torch.tensor(s), torch.tensor(t), temp)
        assert float(got) == pytest.approx(hand.mean(), rel=1e-5)
        assert float(distill_loss(torch.tensor(s), torch.tensor(t), temp, reduction="sum")) == pytest.approx(
            hand.sum(), rel=1e-5)
    assert float(distill_loss(torch.tensor(t), torch.tensor(t))) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_teacher_at_another_resolution_gets_the_same_crop_box_resized(seed):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    student, teacher = ConsistentViews(24, 40)(img, torch.Generator().manual_seed(seed))
    # By hand: the documented draws (crop box, then flip) from a generator with the same seed.
    gen = torch.Generator().manual_seed(seed)
    box = random_resized_crop_box(70, 50, gen)
    flipped = bool(torch.rand((), generator=gen) < 0.5)
    for view, size in ((student, 24), (teacher, 40)):
        hand = np.asarray(img.crop(box).resize((size, size), Image.BILINEAR), dtype=np.float32) / 127.5 - 1.0
        hand = hand[:, ::-1] if flipped else hand
        assert view.shape == (3, size, size)
        assert torch.equal(view, torch.from_numpy(np.ascontiguousarray(hand)).permute(2, 0, 1)), (seed, size)
    same = ConsistentViews(24, 24)(img, torch.Generator().manual_seed(seed))
    assert torch.equal(same, student)  # one size: one view, served to both networks


def _spy(monkeypatch) -> dict[str, list[torch.Tensor]]:
    """Record every input of the run's teacher and student (hooks on both models)."""
    seen: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}

    def hooked(role, build):
        def wrapper(*a, **k):
            out = build(*a, **k)
            model = out[0] if isinstance(out, tuple) else out
            model.register_forward_pre_hook(lambda m, args: seen[role].append(args[0].detach().clone()))
            return out
        return wrapper

    monkeypatch.setattr(distill, "load_teacher", hooked("teacher", distill.load_teacher))
    monkeypatch.setattr(distill, "build_student", hooked("student", distill.build_student))
    monkeypatch.setattr(distill, "prepare_for_inference", lambda m, **kw: m)  # hook the teacher itself
    return seen


def test_teacher_and_student_receive_identical_input_tensors_every_step(folder, teacher, tmp_path, monkeypatch):
    seen = _spy(monkeypatch)
    run_distill(tiny(folder, tmp_path / "run", teacher, steps=3, batch_split=2, eval_every=3))
    # 3 steps x 2 micro-batches; the student's own forward is not called by evaluation (a frozen copy runs there).
    assert len(seen["teacher"]) == len(seen["student"]) == 6
    for t, s in zip(seen["teacher"], seen["student"], strict=True):
        assert t.shape == (2, 3, 32, 32) and torch.equal(t, s)
    assert not torch.equal(seen["student"][0], seen["student"][2])  # each step its own images
    # MixUp blends pairs: mixed views leave the loader's pixel grid (k / 127.5 - 1) wherever a partner differs.
    off_grid = [not torch.allclose((x + 1) * 127.5, ((x + 1) * 127.5).round(), atol=1e-3) for x in seen["student"]]
    assert any(off_grid)


def test_teacher_at_higher_resolution_sees_the_same_mixed_views(folder, teacher, tmp_path, monkeypatch):
    seen = _spy(monkeypatch)
    run_distill(tiny(folder, tmp_path / "run", teacher, steps=2, teacher_resolution=64, mixup_alpha=0.0))
    assert [t.shape[-1] for t in seen["teacher"]] == [64, 64] and [s.shape[-1] for s in seen["student"]] == [32, 32]
    for t, s in zip(seen["teacher"], seen["student"], strict=True):
        # The same crop at twice the size: averaging 2x2 blocks gives nearly the student's view.
        down = torch.nn.functional.avg_pool2d(t, 2)
        assert float((down - s).abs().mean()) < 0.1


def test_kill_and_resume_ends_with_identical_weights(folder, teacher, tmp_path):
    settings = dict(steps=4, save_every=2, eval_every=2, batch_split=2)
    straight = run_distill(tiny(folder, tmp_path / "straight", teacher, **settings))

    def kill_at_3(done, record):
        if done == 3:
            raise KeyboardInterrupt  # dies after step 3; the last saved state is step 2

    with pytest.raises(KeyboardInterrupt):
        run_distill(tiny(folder, tmp_path / "killed", teacher, **settings), on_step=kill_at_3)
    assert torch.load(tmp_path / "killed" / "state.pt", weights_only=True)["step"] == 2
    resumed = run_distill(tiny(folder, tmp_path / "killed", teacher, **settings))
    a, b = read_checkpoint(straight["checkpoint"])[0], read_checkpoint(resumed["checkpoint"])[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a, log_b = read_jsonl(tmp_path / "straight" / "metrics.jsonl"), read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in log_b] == [r["step"] for r in log_a]
    assert [r.get("loss") for r in log_b] == [r.get("loss") for r in log_a]
    assert resumed["top1"] == straight["top1"] and math.isfinite(straight["final_loss"])
    assert not (tmp_path / "killed" / "state.pt").exists() and (tmp_path / "killed" / "metrics.csv").is_file()
    assert run_distill(tiny(folder, tmp_path / "killed", teacher, **settings)) == resumed  # finished: unchanged
    assert [r["step"] for r in read_jsonl(tmp_path / "killed" / "metrics.jsonl")] == [r["step"] for r in log_a]
    with pytest.raises(UserError, match="other settings"):
        run_distill(tiny(folder, tmp_path / "killed", teacher, **{**settings, "temperature": 2.0}))


def test_resuming_with_another_teacher_file_is_refused(folder, tmp_path):
    path = write_teacher(tmp_path / "teacher.safetensors", seed=0)
    config = tiny(folder, tmp_path / "run", path, steps=4, save_every=1, keep_state=True)

    def kill_at_1(done, record):
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_distill(config, on_step=kill_at_1)
    original = path.read_bytes()
    write_teacher(path, seed=1)  # same file name, other weights
    with pytest.raises(RunDirError, match="teacher_sha256 changed since this run started"):
        run_distill(config)
    path.write_bytes(original)
    assert run_distill(config)["steps"] == 4
    assert (tmp_path / "run" / "state.pt").is_file()  # keep_state


def test_the_student_learns_the_teacher_from_unlabelled_images(folder, teacher, tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    for p in sorted(folder.rglob("*.png")):
        (loose / p.name).write_bytes(p.read_bytes())
    summary = run_distill(tiny(loose, tmp_path / "run", teacher, steps=6, lr=0.003))
    assert summary["top1"] is None and summary["train_examples"] == 18
    losses = [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0]
    labelled = run_distill(tiny(loose, tmp_path / "eval", teacher, steps=1, eval_data=str(folder)))
    assert labelled["eval_examples"] == 18  # a source without a test split is evaluated on all of it
    model_labels = read_checkpoint(labelled["checkpoint"])[1]
    assert "blue" in model_labels.get("labels", "")


def test_refusals(folder, teacher, tmp_path):
    four = write_teacher(tmp_path / "four.safetensors", classes=4, labels=None)
    with pytest.raises(UserError, match="teacher predicts 4 classes but the labelled data has 3"):
        run_distill(tiny(folder, tmp_path / "a", four))
    renamed = write_teacher(tmp_path / "renamed.safetensors", labels=("red", "green", "blue"))
    with pytest.raises(UserError, match="not the data's"):
        run_distill(tiny(folder, tmp_path / "b", renamed))
    student = tmp_path / "student.safetensors"
    save_checkpoint(ResNetV2("R14x0.5", 5), student)
    with pytest.raises(UserError, match="5-class head but the teacher predicts 3 classes; pass --new-head"):
        run_distill(tiny(folder, tmp_path / "c", teacher, student_weights=str(student)))
    arrays = random_authors_arrays(26, 0.5, classes=3)
    arrays["resnet/head/conv2d/bias"][1] = np.nan
    np.savez(tmp_path / "nan.npz", **arrays)
    with pytest.raises(CheckpointError, match="NaN"):
        run_distill(tiny(folder, tmp_path / "d", tmp_path / "nan.npz"))
    with pytest.raises(UserError, match="random weights|no weights"):
        run_distill(tiny(folder, tmp_path / "e", "R26x0.5"))
    for bad in (dict(temperature=0), dict(mixup_alpha=-1), dict(warmup=4), dict(optimizer="lamb"), dict(lr=math.nan)):
        with pytest.raises(UserError):
            run_distill(tiny(folder, tmp_path / "f", teacher, **bad))
    assert not any((tmp_path / n).exists() for n in "abcdef")  # nothing written by a refused run


def test_cli_distill(folder, teacher, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["distill", "--data", str(folder), "--teacher", str(teacher), "--student", "R14x0.5", "--out", str(out),
            "--steps", "2", "--batch", "4", "--resolution", "32", "--teacher-resolution", "40", "--workers", "0",
            "--quiet"]
    assert main(argv) == 0
    assert "checkpoint:" in capsys.readouterr().out
    state, meta = read_checkpoint(out / "checkpoint.safetensors")
    assert state["head.weight"].shape[0] == 3 and meta.get("source") == "distill"
    assert main([*argv[:-1], "--temperature", "0"]) == 2
    assert "temperature" in capsys.readouterr().err
