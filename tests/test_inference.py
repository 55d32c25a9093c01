"""predict and embed over folders with hostile files: results equal the eager model's, bad files named and skipped."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bigtransfer.cli import main
from bigtransfer.data.images import load_for_eval
from bigtransfer.deploy.inference import embed_files, expand_inputs, label_names, load_model, predict_files
from bigtransfer.model.checkpoints import save_checkpoint
from bigtransfer.model.resnetv2 import ResNetV2

SIZE = 32
LABELS = ["cat", "dog", "bird", "fish"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = ResNetV2("R14x0.5", len(LABELS), zero_head=False).eval()
    with torch.no_grad():
        m.head.weight.normal_(0, 0.3)  # spread the classes so the top-k order is meaningful
    m.labels = list(LABELS)
    return m


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "m.safetensors")


@pytest.fixture()
def folder(tmp_path):
    """Four decodable images in varied modes and sizes, three hostile '.jpg' files and one ignored text file."""
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 255, (20, 50), dtype=np.uint8), "L").save(root / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (33, 33, 4), dtype=np.uint8), "RGBA").save(root / "sub" / "c.png")
    Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)).save(root / "sub" / "d.bmp")
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
    (root / "empty.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "text.jpg").write_text("this is not a picture\n")
    (root / "notes.txt").write_text("ignored: not an image suffix")
    return root


GOOD = ["a.png", "b.jpg", "sub/c.png", "sub/d.bmp"]
HOSTILE = {"empty.jpg": "empty file", "truncated.jpg": "cannot decode", "text.jpg": "not an image"}


def _eager(model, files, fn):
    x = torch.stack([load_for_eval(f, SIZE) for f in files])
    with torch.no_grad():
        return fn(x)


def test_expand_inputs_walks_folders_and_reports_missing_paths(folder):
    files, problems = expand_inputs([folder, folder / "nope.png"])
    names = sorted(str(f.relative_to(folder)) for f in files)
    assert names == sorted(GOOD + list(HOSTILE))  # notes.txt is not an image file
    assert [(p.path, p.reason) for p in problems] == [(str(folder / "nope.png"), "no such file or directory")]


def test_predict_files_matches_eager_softmax_and_skips_hostile_files(model, folder):
    files, _ = expand_inputs([folder])
    seen = []
    preds, skipped = predict_files(model, files, SIZE, top_k=3, labels=LABELS, batch_size=2, workers=2,
                                   device="cpu", on_skip=seen.append)
    assert {s.path.rsplit("/", 1)[-1]: s.reason for s in skipped}.keys() == HOSTILE.keys()
    for s in skipped:
        assert HOSTILE[s.path.rsplit("/", 1)[-1]] in s.reason
    assert seen == skipped
    good = [f for f in files if f.name not in HOSTILE]
    assert [p.path for p in preds] == [str(f) for f in good]  # input order kept
    probs = torch.softmax(_eager(model, good, model).double(), dim=1)
    for p, row in zip(preds, probs, strict=True):
        want = row.topk(3)
        assert [i for i, _, _ in p.top] == want.indices.tolist()
        assert [name for _, name, _ in p.top] == [LABELS[i] for i in want.indices.tolist()]
        assert np.allclose([s for _, _, s in p.top], want.values.numpy(), atol=1e-4)  # fast path: 1e-4


def test_embed_files_equals_forward_features(model, folder):
    files, _ = expand_inputs([folder])
    emb = embed_files(model, files, SIZE, batch_size=3, workers=0, device="cpu")
    good = [str(f) for f in files if f.name not in HOSTILE]
    assert emb.files == good and len(emb.skipped) == 3
    assert emb.features.shape == (4, model.feature_dim) and emb.features.dtype == np.float32
    want = _eager(model, good, model.forward_features).numpy()
    assert np.abs(emb.features - want).max() <= 1e-4 * np.abs(want).max()  # the fast path's fp32 contract


def test_cli_predict_json_uses_label_names_from_the_checkpoint(checkpoint, folder, capsys):
    rc = main(["predict", str(folder), str(folder / "missing.png"), "--weights", str(checkpoint), "--top-k", "2",
               "--resolution", str(SIZE), "--json", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0
    doc = json.loads(out)
    assert len(doc) == 4
    assert all(len(d["top"]) == 2 and d["top"][0]["label"] in LABELS for d in doc)
    assert all(d["top"][0]["score"] >= d["top"][1]["score"] for d in doc)
    for name, reason in HOSTILE.items():
        line = next(ln for ln in err.splitlines() if name in ln)
        assert line.startswith("skipped ") and reason in line
    assert "missing.png: no such file or directory" in err
    assert "4 images classified, 4 skipped" in err
    assert "Traceback" not in err


def test_cli_predict_exits_nonzero_when_nothing_was_classified(checkpoint, folder, capsys):
    rc = main(["predict", str(folder / "empty.jpg"), str(folder / "text.jpg"), "--weights", str(checkpoint),
               "--resolution", str(SIZE), "--device", "cpu"])
    _, err = capsys.readouterr()
    assert rc == 1
    assert "empty.jpg: empty file" in err and "text.jpg: not an image" in err


def test_cli_embed_writes_features_and_file_list(model, checkpoint, folder, tmp_path, capsys):
    out = tmp_path / "out" / "features.npy"
    rc = main(["embed", str(folder), "--weights", str(checkpoint), "--out", str(out), "--resolution", str(SIZE),
               "--batch", "2", "--device", "cpu"])
    _, err = capsys.readouterr()
    assert rc == 0
    listed = (tmp_path / "out" / "features.files.txt").read_text().splitlines()
    assert [str(p.relative_to(folder)) for p in map(Path, listed)] == GOOD
    feats = np.load(out)
    assert feats.shape == (4, model.feature_dim)
    want = _eager(model, listed, model.forward_features).numpy()
    assert np.abs(feats - want).max() <= 1e-4 * np.abs(want).max()  # the fast path's fp32 contract
    for name in HOSTILE:
        assert f"{name}:" in err
    assert sorted(p.name for p in out.parent.iterdir()) == ["features.files.txt", "features.npy"]


def test_label_names_from_the_released_label_file(tmp_path, monkeypatch):
    from bigtransfer.model.downloads import cache_dir

    big = ResNetV2("R14x0.5", 1000)
    labels, why = label_names(big, "BiT-S-R50x1")  # offline and not cached: indices, with the reason
    assert labels is None and "BIGTRANSFER_OFFLINE" in why
    names = [f"class {i}" for i in range(1000)]
    cache_dir().mkdir(parents=True, exist_ok=True)
    (cache_dir() / "ilsvrc2012_wordnet_lemmas.txt").write_text("\n".join(names) + "\n")
    labels, why = label_names(big, "BiT-S-R50x1")
    assert labels == names and why is None
    labels, why = label_names(big, "R50x1")  # a bare architecture has no label file
    assert labels is None and "indices" in why


def test_load_model_needs_weights_and_reads_the_architecture_from_the_checkpoint(model, checkpoint):
    with pytest.raises(ValueError, match="no weights of its own"):
        load_model("R26x0.5", None)
    loaded = load_model(None, checkpoint)
    assert loaded.arch == model.arch and loaded.labels == LABELS
    theirs = model.state_dict()
    assert all(torch.equal(t, theirs[k]) for k, t in loaded.state_dict().items())
