"""Hostile but realistic inputs (issue 15): bad weights, bad options, bad output paths, disk full, absurd sizes.

Each case asserts the refusal names the file or setting, comes before any work, and leaves nothing behind.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bigtransfer import create_model, save_checkpoint
from bigtransfer.cli import main
from bigtransfer.core.atomic import DiskFullError, atomic_path
from bigtransfer.core.errors import UserError
from bigtransfer.engine.runstate import save_run_state
from bigtransfer.model.checkpoints import CheckpointError, write_safetensors
from bigtransfer.model.resnetv2 import ResNetV2, parse_arch

TINY = ["--model", "R14x0.5", "--batch", "4", "--resolution", "36", "32", "--workers", "0", "--quiet"]


def _cli_error(argv: list[str], capsys) -> str:
    """Run the CLI; assert it refused with exit 2 and a one-line error, no traceback; return that line."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    line = err.splitlines()[-1]  # notes may come first
    assert line.startswith(f"bigtransfer {argv[0]}: error: ") and "Traceback" not in err, err
    return line


def _model(classes: int = 2) -> ResNetV2:
    torch.manual_seed(0)
    return ResNetV2("R14x0.5", classes, zero_head=False).eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


# ---------------------------------------------------------------- 6. NaN / Inf weights


@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory) -> Path:
    model = _model()
    with torch.no_grad():
        model.stages[1][0].conv2.weight[0, 0, 1, 1] = float("nan")
    path = tmp_path_factory.mktemp("nan") / "nan.safetensors"
    save_checkpoint(model, path)
    return path


def test_nan_weights_are_refused_by_predict_convert_and_finetune(nan_checkpoint, images, tmp_path, capsys):
    for argv in (["predict", str(images / "a" / "0.png"), "--weights", str(nan_checkpoint), "--resolution", "32"],
                 ["convert", str(nan_checkpoint), str(tmp_path / "out.safetensors")],
                 ["finetune", "--data", str(images), "--out", str(tmp_path / "run"), "--steps", "2",
                  "--weights", str(nan_checkpoint), *TINY]):
        err = _cli_error(argv, capsys)
        assert f"{nan_checkpoint}: weights that are NaN or infinite" in err, err
        assert "stages.1.0.conv2.weight (1 of" in err and "learning rate" not in err and "lr" not in err
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_infinite_weights_in_other_formats_are_named(tmp_path, suffix):
    model = _model()
    with torch.no_grad():
        model.norm.bias[3] = float("inf")
    path = tmp_path / f"m{suffix}"
    if suffix == ".npz":
        save_checkpoint(model, path)
    else:
        torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match=rf"m\{suffix}: weights that are NaN or infinite .* norm\.bias"):
        create_model("R14x0.5", pretrained=path)


def test_fp16_overflow_is_refused_before_writing(tmp_path):
    model = _model()
    with torch.no_grad():
        model.head.bias[0] = 1e6  # finite in float32, infinite in float16
    with pytest.raises(CheckpointError, match=r"infinite once stored as float16 .* head\.bias"):
        write_safetensors(model.state_dict(), tmp_path / "h.safetensors", dtype=torch.float16)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- 7. ws_eps


@pytest.mark.parametrize("eps", ["nan", "-1", "0", "inf"])
def test_convert_refuses_a_non_positive_or_non_finite_ws_eps(tmp_path, capsys, eps):
    save_checkpoint(_model(), tmp_path / "m.safetensors")
    err = _cli_error(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "o.safetensors"),
                      "--ws-eps", eps], capsys)
    assert "ws_eps must be a finite positive number" in err
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("eps", [float("nan"), -1.0, 0.0, True])
def test_create_model_refuses_a_bad_ws_eps(eps):
    with pytest.raises(UserError, match="ws_eps must be a finite positive number"):
        create_model("R14x0.5", ws_eps=eps)


def test_a_bad_ws_eps_in_metadata_names_the_file(tmp_path):
    model = _model()
    write_safetensors(model.state_dict(), tmp_path / "m.safetensors", {"ws_eps": "nan"})
    with pytest.raises(CheckpointError, match=r"m\.safetensors: its metadata records ws_eps 'nan'"):
        create_model("R14x0.5", pretrained=tmp_path / "m.safetensors")


# ---------------------------------------------------------------- 8. convert --labels


def test_convert_labels_must_match_the_classes_and_be_utf8(tmp_path, capsys):
    save_checkpoint(_model(2), tmp_path / "m.safetensors")
    (tmp_path / "three.txt").write_text("cat\ndog\nbird\n")
    err = _cli_error(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "o.safetensors"),
                      "--labels", str(tmp_path / "three.txt")], capsys)
    assert "three.txt: 3 class names, but" in err and "has 2 classes" in err
    (tmp_path / "latin1.txt").write_bytes("chat\nchien fran\xe7ais\n".encode("latin-1"))
    err = _cli_error(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "o.safetensors"),
                      "--labels", str(tmp_path / "latin1.txt")], capsys)
    assert f"{tmp_path / 'latin1.txt'}: not UTF-8 text" in err
    assert not (tmp_path / "o.safetensors").exists()
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "o.safetensors"),
                 "--labels", str(tmp_path / "two.txt")]) == 0
    assert create_model("R14x0.5", pretrained=tmp_path / "o.safetensors").labels == ["cat", "dog"]


def test_metadata_labels_of_the_wrong_count_are_named(tmp_path):
    model = _model(2)
    write_safetensors(model.state_dict(), tmp_path / "m.safetensors", {"labels": json.dumps(["a", "b", "c"])})
    with pytest.raises(CheckpointError, match=r"m\.safetensors: its metadata names 3 classes, but the head has 2"):
        create_model("R14x0.5", pretrained=tmp_path / "m.safetensors")


# ---------------------------------------------------------------- 9. output paths, checked first


def test_output_paths_are_checked_before_the_work(tmp_path, capsys, monkeypatch):
    import bigtransfer.deploy.export as export_module

    save_checkpoint(_model(), tmp_path / "m.safetensors")
    monkeypatch.setattr(export_module, "folded_module", lambda m: pytest.fail("the export started"))
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    export = ["export", "--weights", str(tmp_path / "m.safetensors"), "--format", "torchscript", "--out"]
    cases = [
        ([*export, str(tmp_path / "adir")], f"{tmp_path / 'adir'}: is a directory"),
        ([*export, str(tmp_path / "afile" / "m.pt")], f"{tmp_path / 'afile' / 'm.pt'}: cannot be created, "
                                                       f"{tmp_path / 'afile'} is not a directory"),
        ([*export, "/proc/foo.pt"], "/proc/foo.pt: cannot write into /proc"),
        (["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "full")], "full: a folder holding other files"),
    ]
    (tmp_path / "full").mkdir()  # an HF transformers folder is written only into a new, empty or model folder
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "d.npz").mkdir()
    cases.append((["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "d.npz")], "d.npz: is a directory"))
    for argv, expected in cases:
        err = _cli_error(argv, capsys)
        assert expected in err and ".partial" not in err, err
    with pytest.raises(UserError, match=r"ckpt\.safetensors: is a directory"):
        (tmp_path / "ckpt.safetensors").mkdir()
        save_checkpoint(_model(), tmp_path / "ckpt.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile", "ckpt.safetensors", "d.npz", "full",
                                                          "m.safetensors"]
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]


def test_a_failed_rename_names_the_destination_not_the_temporary(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "inside").write_text("x")
    with pytest.raises(OSError) as e, atomic_path(tmp_path / "taken") as tmp:
        tmp.write_text("new")
    assert str(tmp_path / "taken") in str(e.value) and ".partial" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


# ---------------------------------------------------------------- 10. create_model and forward arguments


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(pretrained=1), TypeError, "pretrained must be True, False, None or a checkpoint path, got 1"),
    (dict(pretrained=0.0), TypeError, "pretrained must be"),
    (dict(num_classes=True), TypeError, "num_classes must be an int >= 0"),
    (dict(num_classes="10"), TypeError, "num_classes must be an int >= 0"),
    (dict(num_classes=1.5), TypeError, "num_classes must be an int >= 0"),
    (dict(num_classes=-1), UserError, "num_classes must be >= 0"),
])
def test_create_model_checks_argument_types(kwargs, error, message):
    with pytest.raises(error, match=message):
        create_model("R14x0.5", **kwargs)


def test_create_model_needs_a_name():
    with pytest.raises(TypeError, match="create_model needs a model name .*got None"):
        create_model(None)


def test_num_classes_0_means_no_head_for_random_and_pretrained(tmp_path):
    random_model = create_model("R14x0.5", num_classes=0)
    save_checkpoint(_model(5), tmp_path / "m.safetensors")
    loaded = create_model("R14x0.5", pretrained=tmp_path / "m.safetensors", num_classes=0).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for model in (random_model.eval(), loaded):
        assert model.num_classes == 0 and model.head is None
        assert not any(k.startswith("head.") for k in model.state_dict())
        with torch.no_grad():
            assert torch.equal(model(x), model.forward_features(x)) and model(x).shape == (2, model.feature_dim)
    # A headless model saves and loads back headless.
    save_checkpoint(loaded, tmp_path / "features.safetensors")
    again = create_model("R14x0.5", pretrained=tmp_path / "features.safetensors")
    assert again.num_classes == 0
    assert create_model("R14x0.5", pretrained=tmp_path / "features.safetensors", num_classes=4).num_classes == 4


def test_forward_casts_float64_and_refuses_integer_images():
    model = _model()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(x.double()), model(x))
        with pytest.raises(TypeError, match=r"float images in \[-1, 1\], got torch.uint8"):
            model((x * 127).to(torch.uint8))
        with pytest.raises(UserError, match=r"takes \(N, 3, H, W\) images, got \(3, 32, 32\)"):
            model(x[0])


# ---------------------------------------------------------------- weak: one line for user errors only


def test_cli_one_line_for_user_errors_and_tracebacks_for_bugs(tmp_path, capsys, monkeypatch):
    from bigtransfer.cli import models as models_verb

    assert "no such checkpoint file" in _cli_error(["convert", str(tmp_path / "none.npz"),
                                                    str(tmp_path / "o.npz")], capsys)
    monkeypatch.setattr(models_verb, "run", lambda args: {}["bug"])
    with pytest.raises(KeyError):
        main(["models"])

    def internal(args):
        raise RuntimeError("an internal failure")

    monkeypatch.setattr(models_verb, "run", internal)
    with pytest.raises(RuntimeError, match="an internal failure"):
        main(["models"])


def test_project_errors_are_user_errors():
    from bigtransfer.corpus.build import CorpusError
    from bigtransfer.corpus.fonts import FontError
    from bigtransfer.data.images import ImageError
    from bigtransfer.data.shards import ShardError
    from bigtransfer.data.sources import DataSourceError
    from bigtransfer.deploy.export import ExportError
    from bigtransfer.evaluation.protocol_runs import ProtocolDirError
    from bigtransfer.model.downloads import DownloadError
    from bigtransfer.transfer.finetune import RunDirError

    for cls in (CheckpointError, CorpusError, FontError, ExportError, RunDirError, ImageError, ProtocolDirError,
                ShardError, DataSourceError, DownloadError, DiskFullError):
        assert issubclass(cls, UserError), cls


# ---------------------------------------------------------------- weak: disk full


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1234 vs 1180"),
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_disk_full_names_the_file_and_keeps_the_previous_state(tmp_path, monkeypatch, failure):
    import bigtransfer.engine.runstate as runstate

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_run_state(tmp_path / "state.pt", model=model, optimizer=opt, step=1)
    before = (tmp_path / "state.pt").read_bytes()
    real_save = torch.save

    def fill_the_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # a partial file is on disk when the writer fails
        raise failure

    monkeypatch.setattr(runstate.torch, "save", fill_the_disk)
    with pytest.raises(DiskFullError, match=rf"{tmp_path / 'state.pt'}: no space left on device .*unchanged"):
        save_run_state(tmp_path / "state.pt", model=model, optimizer=opt, step=2)
    assert (tmp_path / "state.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


# ---------------------------------------------------------------- weak: architecture named by a checkpoint


def test_unknown_architecture_in_metadata_says_where_it_came_from(tmp_path, images, capsys):
    model = _model()
    path = tmp_path / "m.safetensors"
    write_safetensors(model.state_dict(), path, {"arch": "R99x1", "num_classes": "2"})
    err = _cli_error(["predict", str(images / "a" / "0.png"), "--weights", str(path), "--resolution", "32"], capsys)
    assert f"{path}: its metadata names the architecture 'R99x1'" in err


# ---------------------------------------------------------------- weak: sanity limits


@pytest.mark.parametrize("extra, expected", [
    (["--resolution", "20000", "20000"], "on 20000x20000 px in micro-batches of 4"),
    (["--batch", "100000000"], "in micro-batches of 100000000"),
    (["--model", "R14x1000"], "training R14x1000 (7,987,225,152,002 parameters)"),
])
def test_runs_that_cannot_fit_are_refused_with_the_numbers(images, tmp_path, capsys, extra, expected):
    err = _cli_error(["finetune", "--data", str(images), "--out", str(tmp_path / "run"), "--steps", "2", *TINY,
                      *extra], capsys)
    assert expected in err and "GiB of memory (a lower-bound estimate), but this machine has" in err
    assert not (tmp_path / "run").exists()


def test_predict_refuses_a_resolution_that_cannot_fit(images, tmp_path, capsys):
    save_checkpoint(_model(), tmp_path / "m.safetensors")
    err = _cli_error(["predict", str(images), "--weights", str(tmp_path / "m.safetensors"),
                      "--resolution", "200000"], capsys)
    assert "R14x0.5 on 200000x200000 px in batches of 8 needs at least" in err


def test_memory_estimate_against_exact_parameter_counts_and_saved_activations():
    from bigtransfer.model.memory import parameter_count, training_bytes

    for name, classes in (("R14x0.5", 3), ("R26x1", 0), ("R50x1", 1000)):
        assert parameter_count(parse_arch(name), classes) == sum(p.numel() for p in ResNetV2(name, classes).parameters())
    # The activations autograd keeps for one image: the estimate is a lower bound within 20% of them.
    model = ResNetV2("R14x0.5", 3)
    weights = {p.data_ptr() for p in model.parameters()}
    sizes: dict[int, int] = {}

    def keep(t):
        if t.data_ptr() not in weights:
            sizes[t.data_ptr()] = t.untyped_storage().nbytes()
        return t

    per_batch = []
    for n in (2, 4):
        sizes.clear()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model(torch.rand(n, 3, 64, 64))
        per_batch.append(sum(sizes.values()))
    saved_per_image = (per_batch[1] - per_batch[0]) / 2
    estimate = (training_bytes(parse_arch("R14x0.5"), 3, 64, 2) - training_bytes(parse_arch("R14x0.5"), 3, 64, 1))
    assert saved_per_image <= estimate <= 1.2 * saved_per_image, (estimate, saved_per_image)


@pytest.mark.parametrize("rtol", ["-1", "nan", "inf"])
def test_export_refuses_a_meaningless_rtol(tmp_path, capsys, rtol):
    save_checkpoint(_model(), tmp_path / "m.safetensors")
    err = _cli_error(["export", "--weights", str(tmp_path / "m.safetensors"), "--format", "torchscript",
                      "--out", str(tmp_path / "m.pt"), "--rtol", rtol], capsys)
    assert "rtol must be a finite number >= 0" in err and not (tmp_path / "m.pt").exists()


# ---------------------------------------------------------------- weak: one step trains nothing; no empty folder


def test_one_step_warns_that_it_trains_nothing(capsys):
    assert main(["hyperrule", "--examples", "100", "--image-size", "32", "32", "--steps", "1"]) == 0
    assert "the only update is the first warm-up step, whose lr is 0" in capsys.readouterr().out
    assert main(["hyperrule", "--examples", "100", "--image-size", "32", "32", "--steps", "2"]) == 0
    assert "warm-up step" not in capsys.readouterr().out
    from bigtransfer.upstream.pretrain import PretrainConfig, make_plan

    plan = make_plan(PretrainConfig(data="x", out="y", steps=1, warmup_steps=1), 10)
    assert plan.lr(0) == 0 and "whose lr is 0" in plan.describe()


def test_a_run_refused_before_its_first_step_leaves_no_folder(tmp_path, capsys):
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "a" / "x.png").write_bytes(b"not an image")
    _cli_error(["finetune", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "deep" / "run"),
                "--steps", "2", *TINY], capsys)
    assert not (tmp_path / "deep").exists()


# ---------------------------------------------------------------- found by the same method


def test_more_output_paths_are_checked_before_the_work(images, tmp_path, capsys, monkeypatch):
    import bigtransfer.deploy.inference as inference

    save_checkpoint(_model(), tmp_path / "m.safetensors")
    monkeypatch.setattr(inference, "runner", lambda *a, **k: pytest.fail("the work started"))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dir.npy").mkdir()
    embed = ["embed", str(images), "--weights", str(tmp_path / "m.safetensors"), "--resolution", "32", "--out"]
    assert f"{tmp_path / 'dir.npy'}: is a directory" in _cli_error([*embed, str(tmp_path / "dir.npy")], capsys)
    assert "is not a directory" in _cli_error([*embed, str(tmp_path / "afile" / "f.npy")], capsys)
    (tmp_path / "f.files.txt").mkdir()
    assert f"{tmp_path / 'f.files.txt'}: is a directory; the file list" in _cli_error([*embed, str(tmp_path / "f.npy")],
                                                                                     capsys)
    err = _cli_error(["evaluate", "linear", "--data", str(images), "--weights", str(tmp_path / "m.safetensors"),
                      "--resolution", "32", "--out", str(tmp_path / "ev"), "--cache", str(tmp_path / "afile")], capsys)
    assert f"{tmp_path / 'afile'}: exists and is not a directory; --cache must name a folder" in err
    pretrain = ["pretrain", "--data", str(images), "--model", "R14x0.5", "--steps", "1", "--batch", "4",
                "--resolution", "32", "--workers", "0", "--quiet"]
    assert "afile: exists and is not a directory" in _cli_error([*pretrain, "--out", str(tmp_path / "afile")], capsys)
    assert "afile: exists and is not a directory" in _cli_error(["demo", "--out", str(tmp_path / "afile")], capsys)


@pytest.mark.parametrize("extra, expected", [
    (["--weight-decay", "nan"], "weight decay must be a finite number >= 0, got nan"),
    (["--weight-decay", "-1"], "weight decay must be a finite number >= 0, got -1.0"),
])
def test_pretrain_refuses_a_meaningless_weight_decay(images, tmp_path, capsys, extra, expected):
    err = _cli_error(["pretrain", "--data", str(images), "--model", "R14x0.5", "--out", str(tmp_path / "run"),
                      "--steps", "1", "--batch", "4", "--resolution", "32", "--workers", "0", "--quiet", *extra],
                     capsys)
    assert expected in err and not (tmp_path / "run").exists()


def test_predict_refuses_negative_workers(images, tmp_path, capsys):
    save_checkpoint(_model(), tmp_path / "m.safetensors")
    err = _cli_error(["predict", str(images), "--weights", str(tmp_path / "m.safetensors"), "--resolution", "32",
                      "--workers", "-1"], capsys)
    assert "workers must be 0 or more, got -1" in err


def test_a_feature_cache_entry_with_non_finite_values_is_recomputed(tmp_path):
    from bigtransfer.evaluation.features import _read_cache

    np.savez(tmp_path / "e.npz", features=np.array([[1.0, np.nan]], np.float32), kept=np.array([0]),
             skipped=np.array("[]"))
    assert _read_cache(tmp_path / "e.npz", 1) is None
    np.savez(tmp_path / "e.npz", features=np.array([[1.0, 2.0]], np.float32), kept=np.array([0]),
             skipped=np.array("[]"))
    assert _read_cache(tmp_path / "e.npz", 1) is not None
