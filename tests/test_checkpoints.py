"""Checkpoint formats: authors' .npz, our .safetensors, timm / HF state dicts; strict, clear errors."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bigtransfer import CheckpointError, create_model, read_checkpoint, save_checkpoint
from bigtransfer.cli import main as cli_main
from bigtransfer.model.checkpoints import read_metadata, write_npz

from .bit_reference import random_authors_arrays


@pytest.fixture
def npz(tmp_path):
    arrays = random_authors_arrays(14, 0.5, classes=6, seed=7)
    path = tmp_path / "authors.npz"
    np.savez(path, **arrays)
    return path, arrays


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_npz_to_safetensors_round_trip_identical(tmp_path, npz):
    path, arrays = npz
    x = torch.rand(2, 3, 48, 48) * 2 - 1
    first = create_model("R14x0.5", pretrained=path)
    first.labels = [f"class {i}" for i in range(6)]
    st = save_checkpoint(first, tmp_path / "m.safetensors", note="round trip")
    meta = read_metadata(st)
    assert meta["arch"] == "R14x0.5" and meta["num_classes"] == "6" and float(meta["ws_eps"]) == 1e-10
    assert json.loads(meta["labels"])[5] == "class 5" and meta["note"] == "round trip"
    second = create_model("R14x0.5", pretrained=st)
    assert second.labels == first.labels
    assert torch.equal(_logits(first, x), _logits(second, x))
    # Export back to the authors' layout reproduces the input arrays exactly.
    out = tmp_path / "back.npz"
    save_checkpoint(second, out)
    with np.load(out) as z:
        assert sorted(z.files) == sorted(arrays)
        for k in arrays:
            assert z[k].shape == arrays[k].shape and np.array_equal(z[k], arrays[k]), k


def test_fp16_safetensors_is_half_size(tmp_path, npz):
    path, _ = npz
    model = create_model("R14x0.5", pretrained=path)
    full = save_checkpoint(model, tmp_path / "f32.safetensors")
    half = save_checkpoint(model, tmp_path / "f16.safetensors", dtype=torch.float16)
    assert half.stat().st_size < 0.55 * full.stat().st_size
    back = create_model("R14x0.5", pretrained=half)
    assert back.root.conv.weight.dtype == torch.float32
    torch.testing.assert_close(back.root.conv.weight, model.root.conv.weight.half().float())


def _timm_keys(state):
    """Our keys in timm's spelling, written independently of the module under test."""
    out = {}
    for k, v in state.items():
        k2 = k.replace("root.conv", "stem.conv").replace("head.", "head.fc.")
        k2 = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k2)
        k2 = k2.replace(".proj.", ".downsample.conv.")
        k2 = re.sub(r"\.gn(\d)\.", r".norm\1.", k2)
        out[k2] = v.clone()
    return out


def test_timm_and_hf_state_dicts_load(tmp_path, npz):
    path, _ = npz
    model = create_model("R14x0.5", pretrained=path)
    x = torch.rand(1, 3, 40, 40) * 2 - 1
    timm_file = tmp_path / "timm.pth"
    torch.save(_timm_keys(model.state_dict()), timm_file)
    timm_model = create_model("R14x0.5", pretrained=timm_file)
    assert timm_model.ws_eps == 1e-8  # timm standardizes with 1e-8 unless told otherwise
    timm_model = create_model("R14x0.5", pretrained=timm_file, ws_eps=1e-10)
    assert torch.equal(_logits(timm_model, x), _logits(model, x))


def test_hf_checkpoint_file_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    cfg = transformers.BitConfig(num_labels=3, depths=[1, 1, 1, 1], hidden_sizes=[128, 256, 512, 1024],
                                 embedding_size=32)
    hf = transformers.BitForImageClassification(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)
    f = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(f))
    ours = create_model("R14x0.5", pretrained=f)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), hf(x).logits, rtol=1e-5, atol=1e-5)


def test_wrong_architecture_is_named(tmp_path, npz):
    path, _ = npz
    with pytest.raises(CheckpointError, match=r"authors\.npz holds an R14x0\.5.*R26x0\.5"):
        create_model("R26x0.5", pretrained=path)


def test_missing_and_misshaped_keys_are_listed(tmp_path, npz):
    _, arrays = npz
    broken = dict(arrays)
    del broken["resnet/block2/unit01/b/group_norm/beta"]
    broken["resnet/block3/unit01/c/standardized_conv2d/kernel"] = np.zeros((1, 1, 64, 99), np.float32)
    path = tmp_path / "broken.npz"
    np.savez(path, **broken)
    with pytest.raises(CheckpointError) as e:
        create_model("R14x0.5", pretrained=path)
    msg = str(e.value)
    assert "broken.npz" in msg
    assert "stages.1.0.gn2.bias" in msg and "missing" in msg
    assert "stages.2.0.conv3.weight" in msg and "(99, 64, 1, 1)" in msg


def test_foreign_keys_are_rejected(tmp_path, npz):
    _, arrays = npz
    path = tmp_path / "extra.npz"
    np.savez(path, **arrays, **{"resnet/block1/unit01/a/dense/kernel": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match="dense/kernel"):
        read_checkpoint(path)


@pytest.mark.parametrize("content,why", [
    (b"", "empty"),
    (b"this is not a checkpoint", "not a readable .npz"),
])
def test_unreadable_files_give_clear_errors(tmp_path, content, why):
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=why) as e:
        read_checkpoint(path)
    assert "bad.npz" in str(e.value)


def test_truncated_npz_and_safetensors(tmp_path, npz):
    path, _ = npz
    data = path.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.npz"):
        read_checkpoint(cut)
    model = create_model("R14x0.5", pretrained=path)
    st = save_checkpoint(model, tmp_path / "m.safetensors")
    cut_st = tmp_path / "cut.safetensors"
    cut_st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        read_checkpoint(cut_st)
    with pytest.raises(CheckpointError, match="no such"):
        read_checkpoint(tmp_path / "nope.npz")


def test_failed_write_leaves_nothing_behind(tmp_path):
    state = {"root.conv.weight": torch.zeros(2, 3, 7, 7), "weird.key": torch.zeros(1)}
    with pytest.raises(CheckpointError):
        write_npz(state, tmp_path / "out.npz")
    assert list(tmp_path.iterdir()) == []


def test_convert_cli_round_trip(tmp_path, npz, capsys):
    path, arrays = npz
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"l{i}" for i in range(6)))
    st = tmp_path / "c.safetensors"
    assert cli_main(["convert", str(path), str(st), "--labels", str(labels)]) == 0
    assert "R14x0.5" in capsys.readouterr().out
    assert json.loads(read_metadata(st)["labels"])[2] == "l2"
    back = tmp_path / "c.npz"
    assert cli_main(["convert", str(st), str(back)]) == 0
    with np.load(back) as z:
        assert all(np.array_equal(z[k], arrays[k]) for k in arrays)
    assert cli_main(["convert", str(tmp_path / "missing.npz"), str(st)]) == 2
    err = capsys.readouterr().err
    assert "missing.npz" in err and "Traceback" not in err
