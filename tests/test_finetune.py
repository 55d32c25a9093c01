"""The fine-tuning loop: outputs, exact gradient accumulation, MixUp, the lr schedule, kill-and-resume, bad files."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bigtransfer import create_model, read_checkpoint
from bigtransfer.data.datasets import load_splits
from bigtransfer.data.images import load_for_eval
from bigtransfer.engine.metrics import read_jsonl
from bigtransfer.model.resnetv2 import ResNetV2
from bigtransfer.transfer.finetune import (
    FinetuneConfig,
    RunDirError,
    evaluate,
    mixup_lambda,
    mixup_loss,
    mixup_permutation,
    run_finetune,
    train_step,
)
from bigtransfer.transfer.hyperrule import make_plan

CLASSES = ("blue", "green", "red")


def make_image_folder(root: Path, per_class: int = 12, size: int = 40, seed: int = 0) -> Path:
    """Real PNG files: noise with one colour channel raised per class, so the classes can be learnt."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 90, (size, size, 3)).astype(np.uint8)
            a[:, :, 2 - c] += 140
            Image.fromarray(a).save(d / f"{name}_{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("colours"))


def tiny(data: Path, out: Path, **kw) -> FinetuneConfig:
    """A run small enough for 2 shared CPU cores: R14x0.5 at 32 px, batch 8, no worker processes."""
    settings = dict(model="R14x0.5", steps=4, batch=8, resolution=(36, 32), workers=0, silent=True, base_lr=0.3)
    settings.update(kw)
    return FinetuneConfig(data=str(data), out=str(out), **settings)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)[0]


@pytest.fixture(scope="module")
def finished(folder, tmp_path_factory):
    """One complete 4-step run (batch split 2, evaluation every 2 steps) and the lr the optimizer really used."""
    out = tmp_path_factory.mktemp("run")
    used_lr: list[float] = []
    original = torch.optim.SGD.step

    def spy(self, *a, **k):
        used_lr.append(self.param_groups[0]["lr"])
        return original(self, *a, **k)

    torch.optim.SGD.step = spy
    try:
        summary = run_finetune(tiny(folder, out, batch_split=2, eval_every=2, steps=4, keep_state=True))
    finally:
        torch.optim.SGD.step = original
    return out, summary, used_lr


def test_end_to_end_writes_every_output_and_the_checkpoint_loads_back(folder, finished):
    out, summary, _ = finished
    for name in ("config.json", "metrics.jsonl", "metrics.csv", "summary.json", "state.pt", "checkpoint.safetensors",
                 "loss.png", "lr.png", "accuracy.png", "confusion.png"):
        assert (out / name).is_file(), name
    for name in ("loss.png", "lr.png", "accuracy.png", "confusion.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG"
    assert not list(out.glob(".*partial"))  # no temporary file left behind

    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["batch_split"] == 2 and config["settings"]["model"] == "R14x0.5"
    assert (config["plan"]["precrop"], config["plan"]["crop"], config["plan"]["end"]) == (36, 32, 4)
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["steps"] == 4 and summary["examples"] == 30 and summary["eval_examples"] == 6
    assert summary["classes"] == list(CLASSES) and summary["model"] == "R14x0.5"
    assert summary["skipped_files"] == [] and summary["images_seen"] == 32
    for key in ("wall_time_s", "train_images_per_s", "eval_images_per_s", "input_images_per_s"):
        assert summary[key] > 0, key
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if "eval" not in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "eval" in r] == [2, 4]
    csv_rows = (out / "metrics.csv").read_text().splitlines()  # the same records, one row each
    assert len(csv_rows) == 1 + len(records) and csv_rows[0].startswith("step,loss,lr,")

    # The checkpoint loads by name, carries the class names, and reproduces the reported accuracy and loss
    # through an independent evaluation path (images.load_for_eval, one image at a time).
    model = create_model("R14x0.5", pretrained=out / "checkpoint.safetensors").eval()
    assert model.labels == list(CLASSES) and model.num_classes == 3
    assert model.data_config["input_size"] == [3, 32, 32]  # evaluation's crop, carried for predict/embed/export
    state = torch.load(out / "state.pt", weights_only=True)["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    held = load_splits(folder, seed=0).eval
    with torch.no_grad():
        logits = torch.cat([model(load_for_eval(it.source, 32)[None]) for it in held])
    labels = torch.tensor([it.label for it in held])
    assert summary["top1"] == pytest.approx(float((logits.argmax(1) == labels).float().mean()))
    assert summary["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-4)
    assert 0.0 <= summary["top1"] <= 1.0 and summary["top5"] is None  # 3 classes: the top 5 always hold the label


def test_lr_of_every_step_equals_the_plan(finished):
    out, _, used_lr = finished
    plan = make_plan(30, (40, 40), batch=8, steps=4, base_lr=0.3, resolution_override=(36, 32))
    peak = 0.3 * 8 / 512
    # Release rule shrunk to 4 steps: warmup 1 step (lr 0 for the first update), then peak, peak/10, peak/100.
    assert [plan.lr(s) for s in range(4)] == pytest.approx([0.0, peak, peak / 10, peak / 100])
    assert used_lr == pytest.approx([plan.lr(s) for s in range(4)], rel=1e-12)
    assert [r["lr"] for r in read_jsonl(out / "metrics.jsonl") if "eval" not in r] == pytest.approx(used_lr)


def test_batch_split_gives_the_same_weights(folder, tmp_path):
    # Batch 4 as one batch or as 4 micro-batches of 1 (GroupNorm normalises each example on its own).
    one = run_finetune(tiny(folder, tmp_path / "q1", steps=3, batch=4, batch_split=1, keep_state=True))
    four = run_finetune(tiny(folder, tmp_path / "q4", steps=3, batch=4, batch_split=4, keep_state=True))
    a, b = weights(Path(one["checkpoint"])), weights(Path(four["checkpoint"]))
    assert a["head.weight"].abs().max() > 1e-3  # the zero head has learnt: there is something to compare
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-5, diff
    # The body got gradients too (at step 3, once the head was no longer zero): its momentum is non-zero and
    # the same either way.
    mom_a, mom_b = (torch.load(tmp_path / q / "state.pt", weights_only=True)["optimizer"]["state"] for q in ("q1", "q4"))
    body = [i for i, v in mom_a.items() if v["momentum_buffer"].dim() == 4]  # conv kernels
    assert min(float(mom_a[i]["momentum_buffer"].abs().max()) for i in body) > 0
    assert max(float((mom_a[i]["momentum_buffer"] - mom_b[i]["momentum_buffer"]).abs().max()) for i in mom_a) < 1e-5


def test_mixup_loss_equals_a_hand_computation():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([0, 2, 1, 1])
    perm = torch.tensor([2, 0, 3, 1])
    lam = 0.3
    lse = np.log(np.exp(logits.double().numpy()).sum(1))
    ce = lambda labels: np.mean(lse - logits.double().numpy()[np.arange(4), labels.numpy()])  # noqa: E731
    hand = lam * ce(y) + (1 - lam) * ce(y[perm])
    assert float(mixup_loss(logits, y, y[perm], lam)) == pytest.approx(hand, rel=1e-6)
    assert float(mixup_loss(logits, y, y[perm], 1.0)) == pytest.approx(ce(y), rel=1e-6)


def test_mixup_inside_a_step_mixes_inputs_with_one_lambda_and_a_permutation_per_micro_batch():
    class Recorder(torch.nn.Module):
        """A linear classifier that keeps every input it sees."""

        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(12, 3)
            self.seen = []

        def forward(self, x):
            self.seen.append(x.detach().clone())
            return self.fc(x.flatten(1))

    torch.manual_seed(0)
    model = Recorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    x = torch.randn(8, 3, 2, 2)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    lam = mixup_lambda(0.1, seed=5, step=7)
    assert 0.0 < lam < 1.0 and lam == mixup_lambda(0.1, seed=5, step=7) != mixup_lambda(0.1, seed=5, step=8)
    loss = train_step(model, opt, [(x[:4], y[:4]), (x[4:], y[4:])], batch=8, lr=0.0, lam=lam, seed=5, step=7)
    expected = 0.0
    for q, (xs, ys) in enumerate([(x[:4], y[:4]), (x[4:], y[4:])]):
        perm = mixup_permutation(4, 5, 7, q)
        mixed = lam * xs + (1 - lam) * xs[perm]
        torch.testing.assert_close(model.seen[q], mixed)
        with torch.no_grad():
            expected += float(mixup_loss(model.fc(mixed.flatten(1)), ys, ys[perm], lam)) * 4 / 8
    assert loss == pytest.approx(expected, rel=1e-6)
    lams = [mixup_lambda(0.1, 0, s) for s in range(2000)]
    assert mixup_lambda(0.0, 0, 3) == 1.0
    assert abs(np.mean(lams) - 0.5) < 0.05 and np.mean([v < 0.05 or v > 0.95 for v in lams]) > 0.5  # Beta(.1,.1)


def test_fp16_and_bf16_steps_train_on_cpu():
    from bigtransfer.engine.device import grad_scaler

    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 0])  # batch 4: the loss of a step is the mean over its 4 examples
    for precision in ("bf16", "fp16"):
        torch.manual_seed(0)
        model = ResNetV2("R14x0.5", 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
        scaler = grad_scaler(torch.device("cpu"), precision)
        assert (scaler is not None) == (precision == "fp16")
        losses = [train_step(model, opt, [(x, y)], batch=4, lr=0.05, precision=precision, scaler=scaler, step=s)
                  for s in range(2)]
        assert losses[0] == pytest.approx(math.log(3), rel=1e-3) and losses[-1] < losses[0], (precision, losses)


def test_kill_and_resume_ends_with_identical_weights(folder, tmp_path):
    settings = dict(steps=4, batch=4, save_every=2, eval_every=2)
    straight = run_finetune(tiny(folder, tmp_path / "straight", **settings))

    def kill_at_3(done, record):
        if done == 3:
            raise KeyboardInterrupt  # dies after step 3; the last saved state is step 2

    with pytest.raises(KeyboardInterrupt):
        run_finetune(tiny(folder, tmp_path / "killed", **settings), on_step=kill_at_3)
    assert torch.load(tmp_path / "killed" / "state.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "killed" / "summary.json").exists()
    resumed = run_finetune(tiny(folder, tmp_path / "killed", **settings))

    a, b = weights(Path(straight["checkpoint"])), weights(Path(resumed["checkpoint"]))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log_a = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    log_b = read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in log_b] == [r["step"] for r in log_a]  # step 3 logged once, not twice
    assert [r.get("loss") for r in log_b] == [r.get("loss") for r in log_a]
    assert resumed["top1"] == straight["top1"] and resumed["loss"] == straight["loss"]
    # Running the finished command again changes nothing.
    assert run_finetune(tiny(folder, tmp_path / "killed", **settings)) == resumed


def test_resume_refuses_other_settings_and_foreign_folders(folder, finished, tmp_path):
    out, _, _ = finished
    with pytest.raises(RunDirError, match=r"--seed was 0, now 1"):
        run_finetune(tiny(folder, out, batch_split=2, eval_every=2, steps=4, seed=1))
    with pytest.raises(RunDirError, match=r"--steps was 4, now 5.*--overwrite"):
        run_finetune(tiny(folder, out, batch_split=2, eval_every=2, steps=5))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="not a bigtransfer run directory"):
        run_finetune(tiny(folder, foreign, steps=1))
    run_finetune(tiny(folder, foreign, steps=1, overwrite=True))
    assert (foreign / "notes.txt").read_text() == "keep me" and (foreign / "summary.json").is_file()


def test_hostile_files_are_named_and_skipped_and_tiny_sets_sample_with_replacement(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=4)
    (data / "red" / "empty.png").write_bytes(b"")
    good = (data / "red" / "red_00.png").read_bytes()
    (data / "red" / "truncated.png").write_bytes(good[: len(good) // 2])
    (data / "green" / "text.jpg").write_text("this is not a JPEG")
    (data / "green" / "readme.txt").write_text("ignored: not an image suffix")
    (data / "green" / ".hidden.png").write_bytes(good)
    Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(data / "blue" / "deep16.png")  # 16-bit grey
    Image.new("P", (40, 40), 3).save(data / "blue" / "palette.png")
    Image.new("RGBA", (40, 40), (0, 0, 255, 128)).save(data / "blue" / "alpha.png")
    Image.new("CMYK", (40, 40), (200, 0, 0, 0)).save(data / "blue" / "cmyk.jpg")
    # 1 example per class: every micro-batch of 8 is larger than the 3-image training set.
    summary = run_finetune(tiny(data, tmp_path / "run", steps=2, examples_per_class=1, val_fraction=0.5))
    skipped = {Path(s["path"]).name: s["reason"] for s in summary["skipped_files"]}
    assert set(skipped) == {"empty.png", "truncated.png", "text.jpg"}
    assert "empty" in skipped["empty.png"] and "not an image" in skipped["text.jpg"]
    assert summary["ignored_files"] >= 2 and summary["examples"] == 3 and summary["steps"] == 2
    assert (tmp_path / "run" / "checkpoint.safetensors").is_file()


def test_evaluate_through_the_fast_path_equals_the_plain_model(monkeypatch):
    import bigtransfer.transfer.finetune as finetune_module

    used = []
    real = finetune_module.prepare_for_inference
    monkeypatch.setattr(finetune_module, "prepare_for_inference", lambda m, *a, **k: used.append(m) or real(m, *a, **k))
    torch.manual_seed(0)
    model = ResNetV2("R14x0.5", 4, zero_head=False).train()
    batches = [(torch.rand(5, 3, 40, 40) * 2 - 1, torch.randint(0, 4, (5,))) for _ in range(3)]
    result = evaluate(model, batches, 4)
    assert used == [model]  # once per evaluation, not per batch
    assert model.training  # restored
    with torch.no_grad():
        logits = torch.cat([model.eval()(x) for x, _ in batches])
    y = torch.cat([t for _, t in batches])
    assert result["examples"] == 15
    assert result["top1"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert result["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)


def test_val_and_test_folders_score_on_test_and_say_so(tmp_path, capsys):
    root = tmp_path / "data"
    make_image_folder(root / "train", per_class=6, size=36, seed=1)
    make_image_folder(root / "val", per_class=2, size=36, seed=2)  # 6 images, other pixels than test's
    make_image_folder(root / "test", per_class=3, size=36, seed=3)  # 9 images
    summary = run_finetune(tiny(root, tmp_path / "run", steps=3, silent=False, quiet=True))
    assert summary["eval_split"] == "test" and summary["eval_examples"] == 9
    assert summary["unused_splits"] == {"val": 6}
    printed = capsys.readouterr().out
    assert "on 9 test images; val (6 images) not used" in printed
    # The reported loss is the checkpoint's on test/'s images (an independent pass), and not on val/'s.
    model = create_model("R14x0.5", pretrained=tmp_path / "run" / "checkpoint.safetensors").eval()

    def loss_on(split: str) -> float:
        files = sorted((root / split).glob("*/*.png"))
        with torch.no_grad():
            logits = torch.cat([model(load_for_eval(str(f), 32)[None]) for f in files])
        labels = torch.tensor([CLASSES.index(f.parent.name) for f in files])
        return float(torch.nn.functional.cross_entropy(logits, labels))

    assert summary["loss"] == pytest.approx(loss_on("test"), rel=1e-4)
    assert abs(summary["loss"] - loss_on("val")) > 1e-3


def test_a_resumed_run_keeps_its_measured_kernels_whatever_the_machine_says_later(folder, tmp_path, monkeypatch):
    """Training picks each layer's kernel by timing (model.kernelcal); RUN/kernels.json keeps resuming exact."""
    from bigtransfer.model import kernelcal

    monkeypatch.setenv("BIGTRANSFER_CALIBRATE", "1")
    monkeypatch.setenv("BIGTRANSFER_CACHE", str(tmp_path / "cache"))

    def prefer(kernel: str) -> None:
        monkeypatch.setattr(kernelcal, "wall_time", lambda fn, label: 1.0 if label[0] == kernel else 2.0)
        kernelcal.cache_file(backward=True).unlink(missing_ok=True)

    settings = dict(steps=4, batch=4, save_every=2, eval_every=4)
    prefer("gemm")
    straight = weights(Path(run_finetune(tiny(folder, tmp_path / "straight", **settings))["checkpoint"]))

    def kill_at_3(done, record):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_finetune(tiny(folder, tmp_path / "killed", **settings), on_step=kill_at_3)
    prefer("cl")  # the machine now measures oneDNN faster everywhere: a fresh run would choose other kernels
    other = weights(Path(run_finetune(tiny(folder, tmp_path / "other", **settings))["checkpoint"]))
    resumed = weights(Path(run_finetune(tiny(folder, tmp_path / "killed", **settings))["checkpoint"]))
    assert any(not torch.equal(straight[k], other[k]) for k in straight)  # the kernels do change the rounding
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    measured = json.loads((tmp_path / "straight" / "kernels.json").read_text())["plans"]
    assert measured and all(p["convs"] and any(c[8] for c in p["convs"]) for p in measured)
    # Under bf16 autocast the GEMM path does not run: the run times no convolution and records the rule for them
    # (its GroupNorms it times in bf16: 5-number keys).
    monkeypatch.setattr(kernelcal, "wall_time", lambda fn, label: 1.0 if len(label[1]) == 5 else pytest.fail(
        "a bf16 run timed a convolution"))
    run_finetune(tiny(folder, tmp_path / "bf16", precision="bf16", steps=1, batch=4))
    plans = json.loads((tmp_path / "bf16" / "kernels.json").read_text())["plans"]
    assert plans and all(p["convs"] is None and "norms" in p for p in plans)
    assert list((tmp_path / "cache" / "kernels").glob("norm-bfloat16-train-*.json"))  # its GroupNorms, in bf16
