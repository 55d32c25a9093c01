"""`bigtransfer finetune` and `bigtransfer demo`: a run, one-line errors, a real kill -9 and resume, the demo data."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bigtransfer import read_checkpoint
from bigtransfer.cli import main
from bigtransfer.core.errors import UserError
from bigtransfer.engine.metrics import read_jsonl
from bigtransfer.model.checkpoints import read_metadata
from bigtransfer.model.registry import resolve
from bigtransfer.model.resnetv2 import ResNetV2
from bigtransfer.transfer.config import EMOJI_VIEWS
from bigtransfer.transfer.demo import EMOJI_TAR, DemoModel, DemoSettings, run_demo, write_digits, write_emoji
from bigtransfer.transfer.finetune import FinetuneConfig, mixup_lambda, run_finetune

from .test_finetune import make_image_folder

TINY = ["--model", "R14x0.5", "--batch", "4", "--resolution", "36", "32", "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("colours"))


def test_cli_run_says_it_starts_from_scratch_and_where_things_are(folder, tmp_path, capsys):
    rc = main(["finetune", "--data", str(folder), "--out", str(tmp_path / "run"), "--steps", "2", "--no-flip", *TINY])
    out = capsys.readouterr().out
    assert rc == 0
    assert "starts from scratch" in out and "step 2/2" in out and "top-1" in out
    assert f"checkpoint: {tmp_path / 'run' / 'checkpoint.safetensors'}" in out and "confusion.png" in out
    settings = json.loads((tmp_path / "run" / "config.json").read_text())["settings"]
    assert settings["flip"] is False and settings["crop"] is True and settings["resolution"] == [36, 32]
    assert (tmp_path / "run" / "summary.json").is_file()


def test_mixup_alpha_option_reaches_the_plan_and_the_log(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "--data", str(folder), "--out", str(out), "--steps", "2", "--mixup-alpha", "0.4",
                 *TINY]) == 0
    assert "mixup alpha set to 0.4" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["mixup_alpha"] == 0.4 and config["plan"]["mixup_alpha"] == 0.4
    lambdas = [r["mixup_lambda"] for r in read_jsonl(out / "metrics.jsonl") if "mixup_lambda" in r]
    assert lambdas == [mixup_lambda(0.4, 0, s) for s in (0, 1)]  # the HyperRule's 0 under 20k would log none
    assert main(["finetune", "--data", str(folder), "--out", str(tmp_path / "bad"), "--mixup-alpha", "-1",
                 *TINY]) == 2
    assert "mixup alpha must be 0 or more" in capsys.readouterr().err


def test_layout_and_checkpointing_options_train_the_same_weights(folder, tmp_path, monkeypatch):
    switched = []
    real = ResNetV2.set_grad_checkpointing
    monkeypatch.setattr(ResNetV2, "set_grad_checkpointing", lambda self, on=True: switched.append(on) or real(self, on))
    weights = {}
    for name, extra in (("cl", []), ("nchw", ["--no-channels-last"]), ("ckpt", ["--grad-checkpointing"])):
        out = tmp_path / name
        assert main(["finetune", "--data", str(folder), "--out", str(out), "--steps", "3", *extra, *TINY]) == 0
        settings = json.loads((out / "config.json").read_text())["settings"]
        assert settings["channels_last"] is (name != "nchw") and settings["grad_checkpointing"] is (name == "ckpt")
        weights[name] = read_checkpoint(out / "checkpoint.safetensors")[0]
        assert switched.pop() is (name == "ckpt")
    for key, w in weights["nchw"].items():
        assert torch.allclose(weights["cl"][key], w, rtol=1e-4, atol=1e-6), key
        assert torch.equal(weights["ckpt"][key], weights["cl"][key]), key  # recomputation is exact
    # The head started at exactly zero: what 3 steps moved it is far beyond the difference between the layouts.
    head_cl, head_nchw = weights["cl"]["head.weight"], weights["nchw"]["head.weight"]
    assert head_nchw.norm() > 0 and (head_cl - head_nchw).norm() < 1e-4 * head_nchw.norm()


def _error(argv, capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("bigtransfer finetune: error: ") and "\n" not in err, err
    return err


def test_wrong_arguments_give_one_clear_line(folder, tmp_path, capsys):
    out = str(tmp_path / "run")
    base = ["finetune", "--data", str(folder), "--out", out, "--steps", "1"]
    cases = [
        (["--data", str(tmp_path / "nowhere")], "nowhere: no such data folder"),
        (["--batch", "6", "--batch-split", "4"], "batch 6 is not divisible by batch-split 4"),
        (["--steps", "0"], "steps must be a positive integer"),
        (["--resolution", "32", "36"], "1 <= CROP <= PRECROP"),
        (["--model", "R15x1"], "unknown model 'R15x1'"),
        (["--weights", str(tmp_path / "missing.safetensors")], "missing.safetensors: no such weights file"),
        (["--val-fraction", "1.5"], "val-fraction must be between 0 and 1"),
        (["--examples-per-class", "11"], "fewer than 11"),
    ]
    for extra, expected in cases:
        assert expected in _error([*base, *TINY, *extra], capsys), extra
    (tmp_path / "file").write_text("x")
    assert "not a directory" in _error([*base, *TINY, "--out", str(tmp_path / "file")], capsys)
    # A released model that is not downloaded, offline: says which file and where to put it.
    err = _error([*base, *TINY, "--model", "BiT-M-R50x1"], capsys)
    assert "BiT-M-R50x1.npz" in err and "BIGTRANSFER_OFFLINE" in err
    # Weights of another architecture, and a file that is not a checkpoint.
    other = tmp_path / "r26.safetensors"
    from bigtransfer import save_checkpoint

    save_checkpoint(ResNetV2("R26x0.5", 3), other)
    assert "holds an R26x0.5" in _error([*base, *TINY, "--weights", str(other)], capsys)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"definitely not safetensors")
    assert "junk.safetensors" in _error([*base, *TINY, "--weights", str(junk)], capsys)


def test_rerun_with_other_settings_is_refused_by_name(folder, tmp_path, capsys):
    run = ["finetune", "--data", str(folder), "--out", str(tmp_path / "run"), "--steps", "1", *TINY]
    assert main(run) == 0
    capsys.readouterr()
    err = _error([*run, "--seed", "3"], capsys)
    assert "--seed was 0, now 3" in err and "--overwrite" in err
    assert main([*run, "--seed", "3", "--overwrite"]) == 0


def test_kill_9_then_rerun_resumes_to_the_same_weights(folder, tmp_path):
    """A real process killed with SIGKILL mid-run; the same command finishes it; weights equal an unbroken run."""
    steps = 20  # room for the kill to land mid-run on a busy machine (steps 2 to 5 took 0.4-0.7 s)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "bigtransfer", "finetune", "--data", str(folder), "--out", str(out),
           "--steps", str(steps), "--save-every", "1", "--eval-every", str(steps), *TINY]
    # Same thread count as this process: CPU kernels may sum in another order with another count.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if any(r.get("step", 0) >= 2 for r in read_jsonl(out / "metrics.jsonl")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "summary.json").exists()
    done_before = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert 2 <= max(done_before) < steps
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stdout

    straight = run_finetune(FinetuneConfig(data=str(folder), out=str(tmp_path / "straight"), model="R14x0.5",
                                           steps=steps, batch=4, resolution=(36, 32), workers=0, silent=True,
                                           eval_every=steps))
    a = read_checkpoint(Path(straight["checkpoint"]))[0]
    b = read_checkpoint(out / "checkpoint.safetensors")[0]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, steps + 1)) + [steps]


def test_demo_digits_folder_and_a_tiny_demo_run(tmp_path, capsys):
    from sklearn.datasets import load_digits

    root = write_digits(tmp_path / "digits", test_per_class=3)
    files = sorted(root.rglob("*.png"))
    assert len(files) == 1797
    assert len(list((root / "test").rglob("*.png"))) == 30 and sorted(p.name for p in (root / "test").iterdir()) == [
        str(d) for d in range(10)]
    digits = load_digits()
    some = files[100]
    with Image.open(some) as img:
        assert img.size == (8, 8) and img.mode == "L"
        expected = np.rint(digits.images[int(some.stem)] * 255 / 16)
        np.testing.assert_array_equal(np.asarray(img), expected)
        assert str(digits.target[int(some.stem)]) == some.parent.name
    mtime = some.stat().st_mtime_ns
    write_digits(tmp_path / "digits", test_per_class=3)  # reused, not rewritten
    assert some.stat().st_mtime_ns == mtime

    settings = DemoSettings(shots=(1, 2), seeds=2, steps=2, batch=10, test_per_class=3, processes=1)
    models = (DemoModel("tiny", "R14x0.5", base_lr=1.0), DemoModel("other", "R14x0.5", base_lr=0.1))
    results = run_demo(tmp_path, settings, models=models, quiet=True)
    out = capsys.readouterr().out
    assert len(results) == 16 and {r["examples"] for r in results} == {10, 20}
    assert {r["eval_examples"] for r in results} == {30}
    assert "2-shot digits" in out and "2-shot emoji" in out and "difference of medians" in out
    assert "checkpoint:" in out and "160/128" in out
    for task in ("emoji", "digits"):
        assert (tmp_path / task / "tiny" / "k2" / "seed1" / "checkpoint.safetensors").is_file()
        table = json.loads((tmp_path / "results.json").read_text())["tasks"][task]["models"]["tiny"]["2"]
        tops = [json.loads((tmp_path / task / "tiny" / "k2" / f"seed{s}" / "summary.json").read_text())["top1"]
                for s in (0, 1)]
        assert table["top1"] == tops and table["median"] == pytest.approx(float(np.median(tops)))
        assert (tmp_path / f"accuracy_vs_shots_{task}.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_emoji_are_real_jpegs_of_classes_the_bundled_model_never_saw(tmp_path):
    root = write_emoji(tmp_path / "emoji", test_per_class=5)
    classes = sorted(p.name for p in (root / "train").iterdir())
    assert len(classes) == 10 and classes == sorted(p.name for p in (root / "test").iterdir())
    for cls in classes:
        assert len(list((root / "train" / cls).glob("*.jpg"))) == EMOJI_VIEWS[0]
        assert len(list((root / "test" / cls).glob("*.jpg"))) == 5
    with Image.open(next((root / "test" / classes[0]).glob("*.jpg"))) as img:
        assert img.format == "JPEG" and img.size == (64, 64) and img.mode == "RGB"
    # "Never saw": none of the classes is a label of the shipped model (its upstream classes)
    labels = set(json.loads(read_metadata(resolve("BiT-Mini-R26x0.5").path)["labels"]))
    assert len(labels) > 5000 and not {f"emoji:{c.replace('_', ' ')}" for c in classes} & labels
    assert any(label.startswith("emoji:") for label in labels)
    with tarfile.open(EMOJI_TAR) as tar:
        source = json.loads(tar.extractfile("emoji/SOURCE.json").read())
    assert sorted(c.split(":", 1)[1].replace(" ", "_") for c in source["classes"]) == classes
    write_emoji(root, test_per_class=3)  # a smaller split removes the test images it no longer holds
    assert len(list((root / "test").rglob("*.jpg"))) == 30


def test_demo_settings_refuse_more_shots_than_the_emoji_task_has():
    with pytest.raises(UserError, match="emoji task has 16"):
        DemoSettings(shots=(1, 17)).validate()
    DemoSettings(shots=(1, 17), tasks=("digits",)).validate()


def test_demo_runs_a_task_named_twice_once(tmp_path, capsys):
    settings = DemoSettings(tasks=("digits", "digits"), shots=(1,), seeds=1, steps=1, batch=10, test_per_class=3,
                            processes=1)
    results = run_demo(tmp_path, settings, models=(DemoModel("tiny", "R14x0.5", base_lr=1.0),), quiet=True)
    assert len(results) == 1 and capsys.readouterr().out.count("1-shot digits") == 1


def test_demo_cli_rejects_bad_numbers(capsys):
    assert main(["demo", "--shots", "0"]) == 2
    assert "--shots must be positive integers" in capsys.readouterr().err
    assert main(["demo", "--resolution", "40", "48"]) == 2
    assert "CROP <= PRECROP" in capsys.readouterr().err


def test_strict_refuses_before_training_and_names_the_bad_file(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=3)
    (data / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a PNG signature and nothing else
    rc = main(["finetune", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1", "--strict", *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and "broken.png" in err and "strict" in err
    assert not (tmp_path / "run" / "state.pt").exists()


def test_output_into_a_closed_pipe_ends_quietly():
    # `bigtransfer models | head -1`: the reader has gone; no traceback, exit 141 like Unix tools. The reading end
    # is closed before the child starts, so its first write fails whatever the timing (reading a line first raced
    # a child that could write all its output into the pipe's buffer and exit 0 before the close).
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "bigtransfer", "models"], stdout=write_end,
                                stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        os.close(write_end)
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 141 and "Traceback" not in err, err
