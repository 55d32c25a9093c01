"""Upstream pre-training: schedule, losses, sampler, augmentation, data, and a short real run that then fine-tunes."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from bigtransfer.data.pretraining import (
    DataSourceError,
    InceptionCrop,
    RankStepSampler,
    load_pretrain_data,
    random_resized_crop_box,
    read_multi_label_manifest,
)
from bigtransfer.upstream.pretrain import PRESETS, PretrainConfig, example_losses, make_plan, precision_at_1, pretrain_loss

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220)}
SHAPES = ("circle", "square")


def write_shapes_dataset(root: Path, n: int = 96, seed: int = 0, size: int = 40) -> Path:
    """A multi-label set: each image is labelled with its colour and shape, and 'striped' when it has stripes."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        color, shape, striped = rng.choice(sorted(COLORS)), rng.choice(SHAPES), rng.random() < 0.3
        img = Image.new("RGB", (size, size), (235, 235, 235))
        d = ImageDraw.Draw(img)
        if striped:
            for y in range(0, size, 6):
                d.line([(0, y), (size, y)], fill=(90, 90, 90), width=2)
        r = rng.randint(size // 4, size // 2 - 2)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        (d.ellipse if shape == "circle" else d.rectangle)([cx - r, cy - r, cx + r, cy + r], fill=COLORS[color])
        name = f"img/{i:04d}.png"
        img.save(root / name)
        lines.append(json.dumps({"path": name, "labels": [color, shape] + (["striped"] if striped else [])}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root / "train.jsonl"


def first_sigmoid_loss(positives: int, classes: int) -> float:
    """Sigmoid loss of one image when every logit is -10: softplus(10) per label, softplus(-10) per other class."""
    softplus = lambda z: math.log1p(math.exp(z))  # noqa: E731 - -log(sigmoid(z)) = softplus(-z)
    return positives * softplus(10.0) + (classes - positives) * softplus(-10.0)


@pytest.fixture
def one_thread():
    """Run torch on one thread: the 2 shared cores are slower with two contending threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- schedule


def test_plan_bit_m_scaled_to_a_short_run():
    plan = make_plan(PretrainConfig(data="x", out="y", preset="bit-m", steps=900, batch=256), examples=10_000)
    # Full bit-m: 90 epochs of 14,197,122 images at 4096 = 311,949 updates; 5000 x 900 / 311,949 = 14.4 -> 14.
    assert PRESETS["bit-m"].full_steps == 311_949
    assert plan.warmup == 14
    assert plan.boundaries == (300, 600, 800)  # epochs 30, 60, 80 of 90 -> the same fractions of 900
    assert plan.peak_lr == pytest.approx(0.03)  # 0.03 x 256 / 256
    assert plan.lr(0) == 0.0 and plan.lr(7) == pytest.approx(0.015) and plan.lr(14) == pytest.approx(0.03)
    assert plan.lr(300) == pytest.approx(0.03) and plan.lr(301) == pytest.approx(0.003)
    assert plan.lr(601) == pytest.approx(3e-4) and plan.lr(899) == pytest.approx(3e-5)


def test_plan_full_scale_and_bit_l_and_epochs():
    full = make_plan(PretrainConfig(data="x", out="y", preset="bit-s"), examples=1_281_167)
    assert (full.steps, full.warmup, full.batch, full.resolution) == (28_151, 5000, 4096, 224)
    assert full.peak_lr == pytest.approx(0.48)  # the spec's 0.03 x 4096 / 256
    assert full.boundaries == (9384, 18767, 25023)  # 28151 x (30, 60, 80) / 90, rounded
    bit_l = make_plan(PretrainConfig(data="x", out="y", preset="bit-l", steps=400, batch=64), examples=1000)
    assert bit_l.boundaries == (100, 230, 300, 370)  # epochs 10, 23, 30, 37 of 40
    by_epochs = make_plan(PretrainConfig(data="x", out="y", epochs=3, batch=100, warmup_steps=5), examples=1001)
    assert by_epochs.steps == 31 and by_epochs.warmup == 5  # ceil(3 x 1001 / 100)


def test_warmup_keeps_the_share_of_images_at_other_batches():
    n = 1_281_167  # bit-s: the full run is 28,151 updates at 4096, warmup 5000 of them (17.8% of the images)
    full = make_plan(PretrainConfig(data="x", out="y", preset="bit-s"), examples=n)
    at_512 = make_plan(PretrainConfig(data="x", out="y", preset="bit-s", batch=512), examples=n)
    assert (full.steps, full.warmup) == (28_151, 5000)
    assert at_512.steps == math.ceil(90 * n / 512) == 225_206
    # 5000 x 4096 images of warmup at batch 512 are 40,000 updates: the same 17.8% share of the run.
    assert at_512.warmup == 40_000 == 5000 * 4096 // 512
    assert at_512.warmup / at_512.steps == pytest.approx(full.warmup / full.steps, rel=1e-3)
    # A run that sees half the images warms up for half as long, at either batch.
    half_512 = make_plan(PretrainConfig(data="x", out="y", preset="bit-s", batch=512, epochs=45), examples=n)
    half_4096 = make_plan(PretrainConfig(data="x", out="y", preset="bit-s", epochs=45), examples=n)
    assert half_512.warmup == 20_000 and half_4096.warmup == 2500
    # A longer run than the preset's keeps the full 5000 x 4096 images of warmup, not more.
    assert make_plan(PretrainConfig(data="x", out="y", preset="bit-s", batch=512), examples=2 * n).warmup == 40_000
    explicit = make_plan(PretrainConfig(data="x", out="y", preset="bit-s", batch=512, warmup_steps=5000), examples=n)
    assert explicit.warmup == 5000  # --warmup-steps still overrides


def test_resuming_a_run_saved_under_the_old_warmup_rule_is_refused_with_the_flag_that_resumes_it():
    from bigtransfer.upstream.pretrain import _check_warmup

    n, path = 1_281_167, Path("run/state.pt")
    config = PretrainConfig(data="x", out="y", preset="bit-s", batch=512)
    plan = make_plan(config, examples=n)  # 40,000 updates of warm-up; the rule before capped it at 5000
    with pytest.raises(ValueError, match="warms up for 5000 updates; now it would be 40000.*--warmup-steps 5000"):
        _check_warmup({}, config, plan, path)  # a state from before the warm-up was recorded
    _check_warmup({"warmup": 40_000}, config, plan, path)  # recorded and equal: resumes
    short = PretrainConfig(data="x", out="y", preset="bit-s", batch=512, steps=900)
    _check_warmup({}, short, make_plan(short, examples=n), path)  # both rules give 160 updates here
    pinned = PretrainConfig(data="x", out="y", preset="bit-s", batch=512, warmup_steps=5000)
    _check_warmup({}, pinned, make_plan(pinned, examples=n), path)  # explicit: compared as a setting instead


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="--epochs or --steps"):
        PretrainConfig(data="x", out="y", epochs=2, steps=3).validate()
    with pytest.raises(ValueError, match="unknown preset"):
        PretrainConfig(data="x", out="y", preset="bit-xl").validate()
    with pytest.raises(ValueError, match="loss must be"):
        PretrainConfig(data="x", out="y", loss="hinge").validate()
    assert PretrainConfig(data="x", out="y").loss == "auto"
    with pytest.raises(ValueError, match="does not split into 2 process"):
        RankStepSampler(100, 10, 0, rank=0, world_size=2, batch_split=3)


# ---------------------------------------------------------------- loss and metric


def test_losses_against_hand_computed_values():
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    softplus = lambda z: math.log1p(math.exp(z))  # noqa: E731 - -log(sigmoid(z)) = softplus(-z)
    row0 = softplus(-2.0) + softplus(-1.0) + softplus(0.0)  # positive class 0, negatives 1 and 2
    row1 = 3 * math.log(2.0)
    assert example_losses(logits, targets, "sigmoid").tolist() == pytest.approx([row0, row1], rel=1e-6)
    assert pretrain_loss(logits, targets, "sigmoid").item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    lse0 = math.log(math.exp(2.0) + math.exp(-1.0) + 1.0)
    soft = [lse0 - 2.0, math.log(3.0)]  # row 1: labels 0 and 1 get half each; every log-prob is -log 3
    assert example_losses(logits, targets, "softmax").tolist() == pytest.approx(soft, rel=1e-6)
    assert precision_at_1(logits, targets).tolist() == [1.0, 1.0]  # argmax 0 is a label in both rows
    assert precision_at_1(torch.tensor([[0.0, 5.0, 0.0]]), torch.tensor([[1.0, 0.0, 1.0]])).tolist() == [0.0]


# ---------------------------------------------------------------- sampler and augmentation


@pytest.mark.parametrize(("world", "split"), [(2, 1), (4, 2), (3, 1)])
def test_ranks_together_see_what_one_process_sees(world, split):
    n, batch, seed = 37, 24, 5
    one = RankStepSampler(n, batch, seed)
    many = [iter(RankStepSampler(n, batch, seed, rank=r, world_size=world, batch_split=split)) for r in range(world)]
    single = iter(one)
    for step in range(6):  # crosses epoch boundaries (37 examples, 24 per step)
        expected = next(single)
        got = [key for it in many for _ in range(split) for key in next(it)]
        assert got == expected == one.step_keys(step)
    # Every epoch visits each example exactly once: steps 0-2 hold positions 0..71, i.e. epoch 0 and 35 of epoch 1.
    first = [i for s in range(3) for i, _ in one.step_keys(s)]
    assert sorted(first[:37]) == list(range(37))
    # Resuming at step 4 yields what an uninterrupted sampler yields there.
    assert next(iter(RankStepSampler(n, batch, seed, start_step=4))) == one.step_keys(4)


def test_random_resized_crop_ranges_and_fallback():
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        left, top, right, bottom = random_resized_crop_box(200, 100, gen)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 200 and 0 <= top < bottom <= 100
        assert 0.08 * 0.95 <= w * h / 20_000 <= 1.0
        assert 0.75 * 0.95 <= w / h <= 4 / 3 * 1.05
    # 1000 x 10: no 8%-of-area crop fits in 10 rows, so the fallback is the centred 13 x 10 (ratio 4/3) crop.
    assert random_resized_crop_box(1000, 10, gen) == (493, 0, 506, 10)


def test_inception_crop_is_keyed_by_the_generator_and_flips():
    # A horizontal ramp: red grows with x, so a flipped view has decreasing red across its columns.
    ramp = Image.fromarray(torch.arange(256).repeat(64, 1).to(torch.uint8).numpy(), "L").convert("RGB")
    crop = InceptionCrop(32)
    views = [crop(ramp, torch.Generator().manual_seed(s)) for s in range(40)]
    assert all(v.shape == (3, 32, 32) and v.min() >= -1 and v.max() <= 1 for v in views)
    assert torch.equal(views[3], crop(ramp, torch.Generator().manual_seed(3)))  # same key, same pixels
    slopes = [float(v[0, :, -1].mean() - v[0, :, 0].mean()) for v in views]
    assert any(s > 0 for s in slopes) and any(s < 0 for s in slopes)  # both unflipped and flipped views occur


# ---------------------------------------------------------------- data


def test_multi_label_manifest(tmp_path):
    manifest = write_shapes_dataset(tmp_path, n=40)
    data = load_pretrain_data(manifest, holdout=0.1, seed=3)
    assert data.classes == ["blue", "circle", "green", "red", "square", "striped"]
    assert data.multi_label and len(data.train) == 36 and len(data.eval) == 4 and data.eval_name == "split"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    by_path = {str(tmp_path / r["path"]): sorted(data.classes.index(lab) for lab in r["labels"]) for r in rows}
    assert all(list(e.labels) == by_path[e.source] for e in data.train + data.eval)
    assert {e.source for e in data.train}.isdisjoint(e.source for e in data.eval)


@pytest.mark.parametrize(("line", "problem"), [
    ('{"path": "img/0000.png", "labels": "red"}', "'labels' must be a list"),
    ('{"path": "img/nope.png", "labels": ["red"]}', "not found"),
    ('{"path": "img/0000.png", "labels": ["red"], "split": "dev"}', "split must be"),
    ('{"path": "img/0000.png", "labels": ["red"]', "not valid JSON"),
])
def test_bad_manifest_lines_are_named(tmp_path, line, problem):
    write_shapes_dataset(tmp_path, n=3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "img/0001.png", "labels": ["red"]}\n' + line + "\n")
    with pytest.raises(DataSourceError, match=problem) as err:
        read_multi_label_manifest(bad)
    assert f"{bad}, line 2" in str(err.value)


def test_single_label_folders_become_one_hot(tmp_path):
    for c, colour in COLORS.items():
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.new("RGB", (16, 16), colour).save(tmp_path / c / f"{i}.png")
    data = load_pretrain_data(tmp_path, holdout=0.25)
    assert not data.multi_label and data.classes == ["blue", "green", "red"]
    assert len(data.train) == 9 and len(data.eval) == 3 and all(len(e.labels) == 1 for e in data.train)


# ---------------------------------------------------------------- a real run, then fine-tuning


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from bigtransfer.upstream.pretrain import run_pretrain

        root = tmp_path_factory.mktemp("shapes")
        manifest = write_shapes_dataset(root, n=96)
        config = PretrainConfig(data=str(manifest), out=str(root / "run"), model="R14x0.5", steps=12, batch=16,
                                resolution=32, lr=0.02, warmup_steps=2, log_every=1, eval_every=6, holdout=0.1,
                                workers=0)
        summary = run_pretrain(config, progress=False)
    finally:
        torch.set_num_threads(before)
    return config, summary


def test_pretraining_decreases_the_loss(pretrained_run):
    config, summary = pretrained_run
    out = Path(config.out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 12
    # Multi-label data, so the default loss is sigmoid and the head starts at zero kernel, bias -10: every logit
    # is -10 before any update, and each image has 2 or 3 of the 6 labels.
    assert first_sigmoid_loss(2, 6) <= losses[0] <= first_sigmoid_loss(3, 6)
    assert sum(losses[-4:]) / 4 < losses[0] - 0.5
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [6, 12] and evals[-1]["eval_loss"] < evals[0]["eval_loss"] < losses[0]
    assert summary["steps"] == 12 and summary["multi_label"] and summary["metric"] == "precision@1"
    assert summary["images_per_s"] > 0 and summary["eval_examples"] == 10
    for png in ("loss.png", "lr.png", "accuracy.png"):
        assert Image.open(out / png).size == (800, 500)
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[0] == "step" and "eval_loss" in rows[0] and len(rows) == 1 + len(records)
    saved = json.loads((out / "config.json").read_text())
    assert saved["plan"]["steps"] == 12 and saved["model"] == "R14x0.5"


def test_checkpoint_loads_scores_and_exports(pretrained_run, tmp_path, one_thread):
    from bigtransfer import create_model, read_checkpoint, save_checkpoint
    from bigtransfer.data.pretraining import eval_batches, load_pretrain_data

    config, summary = pretrained_run
    model = create_model("R14x0.5", pretrained=Path(config.out) / "checkpoint.safetensors").eval()
    assert model.labels == ["blue", "circle", "green", "red", "square", "striped"] and model.num_classes == 6
    assert model.data_config["input_size"] == [3, 32, 32]  # the run's resolution, recorded in the file
    # Re-score the held-out images through the saved file: the same precision@1 and loss the run reported.
    data = load_pretrain_data(config.data, config.holdout, config.seed)
    hits, losses = [], []
    with torch.no_grad():
        for x, y in eval_batches(data, 32, 4, rank=0, world_size=1, workers=0):
            logits = model(x)
            hits += precision_at_1(logits, y).tolist()
            losses += example_losses(logits, y).tolist()
    assert sum(hits) / len(hits) == pytest.approx(summary["eval_precision_at_1"])
    assert sum(losses) / len(losses) == pytest.approx(summary["eval_loss"], rel=1e-4)
    npz = save_checkpoint(model, tmp_path / "pretrained.npz")  # the authors' layout
    state, _ = read_checkpoint(npz)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_resume_refuses_other_settings_and_finished_run_is_stable(pretrained_run, one_thread):
    from dataclasses import replace

    from bigtransfer import read_checkpoint
    from bigtransfer.upstream.pretrain import run_pretrain

    config, summary = pretrained_run
    with pytest.raises(ValueError, match=r"--seed was 0, now 1"):
        run_pretrain(replace(config, seed=1), progress=False)
    before, meta_before = read_checkpoint(Path(config.out) / "checkpoint.safetensors")
    again = run_pretrain(config, progress=False)  # finished: evaluates and rewrites the same weights
    assert again["resumed_from"] == 12 and again["eval_loss"] == pytest.approx(summary["eval_loss"])
    after, meta_after = read_checkpoint(Path(config.out) / "checkpoint.safetensors")
    assert meta_after == meta_before and all(torch.equal(after[k], v) for k, v in before.items())


def test_pretrained_checkpoint_fine_tunes(pretrained_run, tmp_path, one_thread, capsys):
    from bigtransfer import read_checkpoint
    from bigtransfer.cli import main

    config, _ = pretrained_run
    weights = Path(config.out) / "checkpoint.safetensors"
    for c, colour in COLORS.items():  # a small single-label downstream task
        (tmp_path / "colours" / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (24, 24), tuple(max(0, v - 12 * i) for v in colour)).save(tmp_path / "colours" / c / f"{i}.png")
    code = main(["finetune", "--data", str(tmp_path / "colours"), "--model", "R14x0.5", "--weights", str(weights),
                 "--out", str(tmp_path / "ft"), "--steps", "4", "--batch", "6", "--resolution", "36", "32",
                 "--workers", "0", "--quiet"])
    assert code == 0
    assert f"weights from {weights}" in capsys.readouterr().err + (tmp_path / "ft" / "config.json").read_text()
    start, _ = read_checkpoint(weights)
    tuned, meta = read_checkpoint(tmp_path / "ft" / "checkpoint.safetensors")
    assert json.loads(meta["labels"]) == ["blue", "green", "red"]
    # The backbone started from the pre-trained weights: close to them after 4 small steps, but trained.
    root = "root.conv.weight"
    change = (tuned[root] - start[root]).norm() / start[root].norm()
    assert 0 < change < 0.05


def test_cli_reports_bad_data_in_one_line(tmp_path, capsys):
    from bigtransfer.cli import main

    code = main(["pretrain", "--data", str(tmp_path / "missing"), "--model", "R14x0.5", "--out", str(tmp_path / "r"),
                 "--steps", "1", "--batch", "2", "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "missing" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_pretrains_from_tar_shards_with_grad_checkpointing(tmp_path, one_thread, monkeypatch):
    from bigtransfer.data.shards import ShardWriter
    from bigtransfer.model.resnetv2 import ResNetV2
    from bigtransfer.upstream.pretrain import run_pretrain

    switched = []  # pre-training turns checkpointing on through the model, as fine-tuning does
    real = ResNetV2.set_grad_checkpointing
    monkeypatch.setattr(ResNetV2, "set_grad_checkpointing", lambda self, on=True: switched.append(on) or real(self, on))

    manifest = write_shapes_dataset(tmp_path / "src", n=40)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    classes = sorted({lab for r in rows for lab in r["labels"]})
    for split, part, per_shard in (("train", rows[:32], 8), ("val", rows[32:], 8)):
        with ShardWriter(tmp_path / "shards" / split, classes, max_count=per_shard) as w:
            for i, r in enumerate(part):
                w.write(f"s{i}", (tmp_path / "src" / r["path"]).read_bytes(), [classes.index(c) for c in r["labels"]])
    config = PretrainConfig(data=str(tmp_path / "shards"), out=str(tmp_path / "run"), model="R14x0.5", steps=5,
                            batch=8, resolution=32, lr=0.02, log_every=1, workers=0, grad_checkpointing=True)
    summary = run_pretrain(config, progress=False)
    assert switched == [True]
    assert summary["train_examples"] == 32 and summary["multi_label"] and summary["eval_examples"] == 8
    assert first_sigmoid_loss(2, 6) <= summary["first_loss"] <= first_sigmoid_loss(3, 6)
    assert (tmp_path / "run" / "checkpoint.safetensors").is_file()


# ---------------------------------------------------------------- the loss follows the labels


def _first_loss(out: Path) -> float:
    return next(json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(line))


def test_default_loss_follows_the_labels_and_sigmoid_heads_start_at_bias_minus_10(tmp_path, one_thread):
    from bigtransfer import read_checkpoint
    from bigtransfer.upstream.pretrain import run_pretrain

    # Multi-label: every image has exactly 2 of the 5 labels (a colour and a shape).
    manifest = write_shapes_dataset(tmp_path / "multi", n=16)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps({"path": r["path"], "labels": r["labels"][:2]}) + "\n" for r in rows))
    tiny = dict(model="R14x0.5", steps=1, batch=4, resolution=32, log_every=1, workers=0, holdout=0.25)
    multi = run_pretrain(PretrainConfig(data=str(manifest), out=str(tmp_path / "m"), **tiny), progress=False)
    # Zero kernel and bias -10: every logit of the first update is -10, whatever the image; 2 positives, 3 negatives.
    assert multi["multi_label"] and multi["loss"] == "sigmoid"
    assert _first_loss(tmp_path / "m") == pytest.approx(2 * math.log1p(math.exp(10.0)) + 3 * math.log1p(math.exp(-10.0)),
                                                        rel=1e-5)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["loss"] == "sigmoid"

    # Single-label folders: softmax with a zero head, so the first loss is ln(3) for 3 classes.
    for c, colour in COLORS.items():
        (tmp_path / "single" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), colour).save(tmp_path / "single" / c / f"{i}.png")
    single = run_pretrain(PretrainConfig(data=str(tmp_path / "single"), out=str(tmp_path / "s"), **tiny),
                          progress=False)
    assert not single["multi_label"] and single["loss"] == "softmax"
    assert _first_loss(tmp_path / "s") == pytest.approx(math.log(3.0), rel=1e-5)
    # After one small update the heads are still near where they started: bias -10 (sigmoid), 0 (softmax).
    for run, start, n in (("m", -10.0, 5), ("s", 0.0, 3)):
        bias = read_checkpoint(tmp_path / run / "checkpoint.safetensors")[0]["head.bias"]
        assert bias.tolist() == pytest.approx([start] * n, abs=1e-2), run


def test_explicit_loss_resumes_and_auto_is_refused_where_it_would_train_another_loss(tmp_path, one_thread):
    from dataclasses import replace

    from bigtransfer.upstream.pretrain import run_pretrain

    manifest = write_shapes_dataset(tmp_path / "multi", n=16)
    config = PretrainConfig(data=str(manifest), out=str(tmp_path / "run"), model="R14x0.5", steps=2, batch=4,
                            resolution=32, log_every=1, workers=0, loss="softmax", stop_after=1)
    assert run_pretrain(config, progress=False)["stopped_at"] == 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["loss"] == "softmax"
    with pytest.raises(ValueError, match=r"--loss was 'softmax', now 'sigmoid'"):
        run_pretrain(replace(config, loss="auto", stop_after=None), progress=False)  # multi-label: auto is sigmoid
    done = run_pretrain(replace(config, stop_after=None), progress=False)  # the same explicit flag resumes
    assert done["resumed_from"] == 1 and done["loss"] == "softmax"
    # The first update started from a zero head (softmax): 6 classes, labels spread over 2-3 of them.
    assert math.log(6.0) <= _first_loss(tmp_path / "run") < math.log(6.0) + 0.1


# ---------------------------------------------------------------- --init-from: continuing a pre-training

def test_init_from_starts_at_the_checkpoint_and_keeps_its_head_on_the_same_classes(pretrained_run, tmp_path,
                                                                                    one_thread):
    from dataclasses import replace

    from bigtransfer import read_checkpoint
    from bigtransfer.upstream.pretrain import run_pretrain

    config, summary = pretrained_run
    ckpt = Path(config.out) / "checkpoint.safetensors"
    # One update whose lr is 0 (the first update of a warm-up): the run's weights are the checkpoint's.
    again = replace(config, out=str(tmp_path / "again"), init_from=str(ckpt), steps=1, warmup_steps=1, eval_every=1)
    result = run_pretrain(again, progress=False)
    start, _ = read_checkpoint(ckpt)
    end, meta = read_checkpoint(tmp_path / "again" / "checkpoint.safetensors")
    assert end.keys() == start.keys() and all(torch.equal(end[k], v) for k, v in start.items())
    # So the held-out set scores exactly as it did at the end of the first run, head included.
    assert result["eval_precision_at_1"] == pytest.approx(summary["eval_precision_at_1"])
    assert result["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
    assert json.loads((tmp_path / "again" / "config.json").read_text())["init_from"] == str(ckpt)


def test_init_from_on_other_classes_gets_a_new_head_and_keeps_ws_eps(pretrained_run, tmp_path, one_thread, capsys):
    from bigtransfer import create_model, read_checkpoint, save_checkpoint
    from bigtransfer.cli import main

    config, _ = pretrained_run
    source = create_model("R14x0.5", pretrained=Path(config.out) / "checkpoint.safetensors", ws_eps=1e-8)
    ckpt = save_checkpoint(source, tmp_path / "eps.safetensors")
    for c, colour in zip(("crimson", "lime", "navy"), COLORS.values(), strict=True):  # single-label, names it has no row of
        (tmp_path / "colours" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (24, 24), tuple(max(0, v - 12 * i) for v in colour)).save(tmp_path / "colours" / c / f"{i}.png")
    code = main(["pretrain", "--data", str(tmp_path / "colours"), "--model", "R14x0.5", "--init-from", str(ckpt),
                 "--out", str(tmp_path / "run"), "--steps", "1", "--warmup-steps", "1", "--batch", "4",
                 "--resolution", "32", "--workers", "0", "--log-every", "1", "--quiet"])
    assert code == 0
    assert "a new head for the data's 3 classes" in capsys.readouterr().err
    start, _ = read_checkpoint(ckpt)
    end, meta = read_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert all(torch.equal(end[k], v) for k, v in start.items() if not k.startswith("head."))
    assert end["head.weight"].shape[0] == 3 and not end["head.weight"].any() and not end["head.bias"].any()
    assert json.loads(meta["labels"]) == ["crimson", "lime", "navy"] and float(meta["ws_eps"]) == 1e-8
    # A zero softmax head: the first loss is ln(3) whatever the backbone.
    assert _first_loss(tmp_path / "run") == pytest.approx(math.log(3.0), rel=1e-5)


def test_init_from_on_more_classes_keeps_the_rows_of_the_labels_it_had(pretrained_run, tmp_path, one_thread):
    """Continuing on data with an extra label: the head's rows move with their names, the new one starts at zero
    weights and the sigmoid's -10 bias (both runs use sigmoid: the data is multi-label)."""
    from dataclasses import replace

    from bigtransfer import read_checkpoint
    from bigtransfer.upstream.pretrain import run_pretrain

    config, _ = pretrained_run
    ckpt = Path(config.out) / "checkpoint.safetensors"
    manifest = write_shapes_dataset(tmp_path / "more", n=24, seed=3)
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    for i, line in enumerate(lines):  # a fourth kind of label, first in sorted order: every old row moves
        line["labels"] = line["labels"] + (["a-framed"] if i % 2 else [])
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    # One update whose lr is 0 (the first of a warm-up): the checkpoint holds the head the run started with.
    run = replace(config, data=str(manifest), out=str(tmp_path / "run"), init_from=str(ckpt), steps=1,
                  warmup_steps=1, eval_every=1)
    run_pretrain(run, progress=False)
    start, old_meta = read_checkpoint(ckpt)
    end, meta = read_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    old_labels, labels = json.loads(old_meta["labels"]), json.loads(meta["labels"])
    assert labels == ["a-framed", *old_labels]
    for j, name in enumerate(labels):
        if name in old_labels:
            i = old_labels.index(name)
            assert torch.equal(end["head.weight"][j], start["head.weight"][i]), name
            assert end["head.bias"][j] == start["head.bias"][i], name
    assert not end["head.weight"][0].any() and end["head.bias"][0].item() == pytest.approx(-10.0)
    assert start["head.weight"].any()  # the kept rows are trained ones, not zeros that would match anyway


def test_init_from_refuses_another_architecture_and_unknown_sources(pretrained_run, tmp_path, capsys):
    from bigtransfer.cli import main

    config, _ = pretrained_run
    ckpt = str(Path(config.out) / "checkpoint.safetensors")
    common = ["pretrain", "--data", config.data, "--steps", "1", "--batch", "4", "--resolution", "32",
              "--workers", "0", "--quiet"]
    assert main([*common, "--model", "R26x0.5", "--init-from", ckpt, "--out", str(tmp_path / "a")]) != 0
    assert "R14x0.5" in capsys.readouterr().err
    assert main([*common, "--model", "R14x0.5", "--init-from", "no-such-model", "--out", str(tmp_path / "b")]) != 0
    assert "--init-from no-such-model: no such file, and not a model name" in capsys.readouterr().err
    # A named model of another architecture is refused from its name, before anything could be downloaded.
    assert main([*common, "--model", "R50x1", "--init-from", "BiT-M-R50x3", "--out", str(tmp_path / "b")]) != 0
    assert "--init-from BiT-M-R50x3 is an R50x3, but --model R50x1 is an R50x1" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_a_run_from_init_from_resumes_exactly(pretrained_run, tmp_path, one_thread):
    from dataclasses import replace

    from bigtransfer import read_checkpoint
    from bigtransfer.upstream.pretrain import run_pretrain

    config, _ = pretrained_run
    source = tmp_path / "source.safetensors"
    source.write_bytes((Path(config.out) / "checkpoint.safetensors").read_bytes())
    go = replace(config, init_from=str(source), steps=3, warmup_steps=1, eval_every=3)
    unbroken = run_pretrain(replace(go, out=str(tmp_path / "unbroken")), progress=False)
    run_pretrain(replace(go, out=str(tmp_path / "broken"), stop_after=1), progress=False)
    source.unlink()  # the resumed run needs its state and config.json only, not the source any more
    resumed = run_pretrain(replace(go, out=str(tmp_path / "broken")), progress=False)
    assert resumed["resumed_from"] == 1 and resumed["final_loss"] == unbroken["final_loss"]
    a, _ = read_checkpoint(tmp_path / "unbroken" / "checkpoint.safetensors")
    b, _ = read_checkpoint(tmp_path / "broken" / "checkpoint.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_a_model_name_loads_its_weights(tmp_path, one_thread):
    from bigtransfer import create_model, read_checkpoint
    from bigtransfer.upstream.pretrain import run_pretrain

    manifest = write_shapes_dataset(tmp_path / "data", n=8)
    config = PretrainConfig(data=str(manifest), out=str(tmp_path / "run"), model="R26x0.5",
                            init_from="BiT-Mini-R26x0.5", steps=1, warmup_steps=1, batch=4, resolution=32, workers=0)
    run_pretrain(config, progress=False)
    bundled = create_model("BiT-Mini-R26x0.5").state_dict()
    end, meta = read_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    assert all(torch.equal(end[k], bundled[k]) for k in end if not k.startswith("head."))
    assert json.loads(meta["labels"]) == ["blue", "circle", "green", "red", "square", "striped"]
