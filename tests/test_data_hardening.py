"""Hostile data (issue 15): odd file names, dead classes, absurd labels, repeated rows, degenerate arrays, bombs."""

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bigtransfer.cli import main
from bigtransfer.core.atomic import atomic_group
from bigtransfer.core.errors import UserError
from bigtransfer.core.paths import shown
from bigtransfer.data import images
from bigtransfer.data.datasets import DataSourceError, load_splits
from bigtransfer.data.images import ImageError, open_rgb
from bigtransfer.data.pretraining import load_pretrain_data, read_multi_label_manifest
from bigtransfer.data.shards import ShardError, ShardWriter, read_index
from bigtransfer.engine.metrics import CONFUSION_MAX_CLASSES, Evaluation, confusion_matrix, confusion_report, to_json
from bigtransfer.evaluation.protocol_runs import write_split_manifest
from bigtransfer.transfer.finetune import _fingerprint

F = ["--model", "R14x0.5", "--steps", "3", "--batch", "4", "--resolution", "40", "32", "--quiet", "--workers", "0"]
CAFE = os.fsdecode(b"caf\xe9.png")  # the bytes of a Latin-1 name: not UTF-8, so Python holds a lone surrogate


def _png(path, colour=(200, 30, 60), size=(20, 20)):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="PNG")
    return path


def _folder(root, counts):
    for c, (name, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            _png(root / name / f"{i}.png", (c * 90, i * 20, 50))
    return root


def _utf8_json(path):
    """The file's JSON, after checking that its bytes are strict UTF-8 with no escaped lone surrogate."""
    text = Path(path).read_bytes().decode("utf-8")  # raises on invalid UTF-8
    assert "\\udc" not in text.lower()
    return json.loads(text)


# ---- item 2: file names that are not UTF-8 ---------------------------------------------------------------------

def test_shown_escapes_only_what_is_not_unicode():
    assert shown("plain/é.png") == "plain/é.png"
    assert shown(CAFE) == "caf\\xe9.png"  # recognisable, and valid UTF-8
    assert shown("\ud800x") == "\\ud800x"  # a surrogate no file name byte makes
    assert json.loads(to_json({CAFE: [CAFE]})) == {"caf\\xe9.png": ["caf\\xe9.png"]}


def test_non_utf8_names_train_evaluate_and_embed(tmp_path, capsys):
    data = _folder(tmp_path / "d", {"a": 5, "b": 5})
    _png(data / "a" / CAFE)  # a readable image with a Latin-1 name
    (data / "b" / CAFE).write_text("not an image")  # an unreadable one: named in every report
    splits = load_splits(data)
    assert any(i.source.endswith(CAFE) for i in splits.train + splits.eval) and len(_fingerprint(splits)) == 16
    assert "b/caf\\xe9.png (not an image" in splits.summary()

    run = tmp_path / "run"
    assert main(["finetune", "--data", str(data), "--out", str(run), *F]) == 0
    summary = _utf8_json(run / "summary.json")
    assert [Path(s["path"]).name for s in summary["skipped_files"]] == ["caf\\xe9.png"]
    assert _utf8_json(run / "config.json")["data"]["skipped"][0]["path"].endswith("b/caf\\xe9.png")
    assert main(["finetune", "--data", str(data), "--out", str(run), *F]) == 0  # same command: same run, reused
    assert "already finished" in capsys.readouterr().out

    weights = str(run / "checkpoint.safetensors")
    assert main(["evaluate", "knn", "--data", str(data), "--weights", weights, "--resolution", "32", "--out",
                 str(tmp_path / "knn"), "--cache", str(tmp_path / "cache"), "--workers", "0"]) == 0
    assert any(s["path"].endswith("b/caf\\xe9.png") for s in _utf8_json(tmp_path / "knn" / "results.json")["skipped"])

    out = tmp_path / "e" / "emb.npy"
    assert main(["embed", str(data), "--weights", weights, "--resolution", "32", "--out", str(out), "--workers", "0",
                 "--no-progress"]) == 0
    rows = (tmp_path / "e" / "emb.files.txt").read_bytes().splitlines()
    assert len(rows) == np.load(out).shape[0] == 11  # 10 + the readable caf\xe9.png; the unreadable one skipped
    assert os.fsencode(data / "a" / CAFE) in rows and all(os.path.isfile(r) for r in rows)  # the OS's exact bytes
    assert "b/caf\\xe9.png" in capsys.readouterr().err
    assert main(["predict", str(data / "a" / CAFE), "--weights", weights, "--resolution", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.encode("utf-8"))[0]["file"].endswith("a/caf\\xe9.png")


def test_split_manifests_carry_non_utf8_names_to_the_reader(tmp_path):
    _folder(tmp_path / "img", {"a": 2, "b": 2})
    odd = _png(tmp_path / "img" / "a" / CAFE)
    rows = [(str(p), p.parent.name, "train") for p in sorted((tmp_path / "img").rglob("*.png"))]
    assert write_split_manifest(tmp_path / "m.csv", rows)
    assert not write_split_manifest(tmp_path / "m.csv", rows)  # unchanged: reported as such
    assert os.fsencode(odd) in (tmp_path / "m.csv").read_bytes()  # the OS's bytes, as a file list holds them
    assert str(odd) in {i.source for i in load_splits(tmp_path / "m.csv").train + load_splits(tmp_path / "m.csv").eval}


def test_a_feature_cache_entry_with_impossible_rows_is_recomputed(tmp_path):
    from bigtransfer.evaluation.features import _read_cache

    for kept in ([0, 5], [1, 0], [-1, 1]):
        np.savez(tmp_path / "c.npz", features=np.zeros((2, 3), np.float32), kept=np.array(kept), skipped=np.array("[]"))
        assert _read_cache(tmp_path / "c.npz", 2) is None
    np.savez(tmp_path / "c.npz", features=np.zeros((2, 3), np.float32), kept=np.array([0, 2]), skipped=np.array(
        json.dumps([["x", "empty file"]])))
    assert _read_cache(tmp_path / "c.npz", 3) is not None


# ---- item 3: outputs that belong together ------------------------------------------------------------------------

def test_atomic_group_writes_all_or_none(tmp_path):
    a, b = tmp_path / "x.npy", tmp_path / "x.files.txt"
    with atomic_group(a, b) as (ta, tb):
        ta.write_bytes(b"1")
        tb.write_bytes(b"2")
    assert a.read_bytes() == b"1" and b.read_bytes() == b"2"
    with pytest.raises(UnicodeEncodeError), atomic_group(a, b) as (ta, tb):
        ta.write_bytes(b"new")
        tb.write_text(CAFE, encoding="utf-8")  # the failure the embed verb used to hit after writing its .npy
    assert a.read_bytes() == b"1" and b.read_bytes() == b"2"  # neither replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.files.txt", "x.npy"]  # no temporaries left
    (tmp_path / "y.files.txt").mkdir()
    with pytest.raises(UserError, match=r"y\.files\.txt: is a folder"), atomic_group(tmp_path / "y.npy",
                                                                                     tmp_path / "y.files.txt"):
        pass
    assert not (tmp_path / "y.npy").exists()


# ---- items 4, 5, 14: dead classes, absurd labels, one class ------------------------------------------------------

def test_a_class_without_any_usable_image_is_refused(tmp_path):
    _folder(tmp_path / "unreadable", {"a": 3})
    (tmp_path / "unreadable" / "b").mkdir()
    for i in range(2):
        (tmp_path / "unreadable" / "b" / f"{i}.png").write_bytes(b"\x89PNG junk")
    with pytest.raises(DataSourceError, match=r"unreadable: 1 of 2 classes have no usable image at all: "
                                              r"b \(2 unreadable\)\. Remove the class"):
        load_splits(tmp_path / "unreadable")
    _folder(tmp_path / "empty", {"a": 3, "b": 2})
    (tmp_path / "empty" / "c").mkdir()
    with pytest.raises(DataSourceError, match=r"empty: 1 of 3 classes have no usable image at all: c \(0 unread"):
        load_splits(tmp_path / "empty")


def test_a_class_only_in_val_trains_with_a_loud_warning_and_true_counts(tmp_path, capsys):
    # Kept, not refused: fixed benchmark splits (VTAB-1k) can miss classes in training that their test split has.
    _folder(tmp_path / "d" / "train", {"a": 3, "b": 3})
    _folder(tmp_path / "d" / "val", {"a": 1, "c": 2})
    (tmp_path / "d" / "val" / "c" / "x.png").write_bytes(b"junk")
    s = load_splits(tmp_path / "d")
    assert s.class_counts() == {"train_per_class": [3, 3, 0], "eval_per_class": [1, 0, 2]}
    text = s.summary()
    assert "train: 6 images (0-3 per class; NONE of class c)" in text and "val: 3 images (0-2 per class; NONE of " \
        "class b)" in text
    assert "WARNING: 1 of 3 classes have no usable training image, so the model never learns them and their val " \
        "images all count as errors: c (2 in val, 1 unreadable)" in text
    assert "WARNING: 1 of 3 classes have no val image, so their accuracy is not measured: b." in text
    assert main(["finetune", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "run"), *F]) == 0
    assert "WARNING: 1 of 3 classes have no usable training image" in capsys.readouterr().out
    data = _utf8_json(tmp_path / "run" / "config.json")["data"]
    assert data["train_per_class"] == [3, 3, 0] and data["eval_per_class"] == [1, 0, 2]
    per_class = _utf8_json(tmp_path / "run" / "summary.json")["per_class_accuracy"]
    assert per_class["b"] is None and per_class["c"] == 0.0  # never trained: every c image is an error


def test_npz_labels_must_be_class_indices_without_gaps(tmp_path):
    x = np.zeros((6, 4, 4, 3), np.uint8)
    np.savez(tmp_path / "gap.npz", images=x, labels=np.array([0, 5, 0, 5, 0, 5]))
    with pytest.raises(DataSourceError, match=r"gap\.npz: labels must be the class indices 0\.\.K-1 .* 2 distinct "
                                              r"values from 0 to 5 \(0, 5\), so 4 classes would have no example"):
        load_splits(tmp_path / "gap.npz")
    np.savez(tmp_path / "huge.npz", images=x, labels=np.array([0, 1, 0, 1, 0, 100000]))
    with pytest.raises(DataSourceError, match=r"3 distinct values from 0 to 100000 .* 99998 classes would have no"):
        load_splits(tmp_path / "huge.npz")  # refused before anything is sized by the largest label
    np.savez(tmp_path / "val.npz", images=x, labels=np.array([0, 1] * 3), val_images=x[:2], val_labels=np.array([1, 7]))
    with pytest.raises(DataSourceError, match=r"3 distinct values from 0 to 7 \(0, 1, 7\), so 5 classes would have"):
        load_splits(tmp_path / "val.npz")
    np.savez(tmp_path / "val2.npz", images=x, labels=np.array([0, 1] * 3), val_images=x[:2], val_labels=np.array([1, 2]))
    assert "have no usable training image, so the model never learns them and their val images all count as " \
        "errors: 2 (1 in val, 0 unreadable)" in load_splits(tmp_path / "val2.npz").summary()
    np.savez(tmp_path / "named.npz", images=x, labels=np.array([0, 2] * 3), class_names=np.array(["x", "y", "z"]))
    with pytest.raises(DataSourceError, match=r"1 of 3 classes have no usable image at all: y \(0 unreadable\)"):
        load_splits(tmp_path / "named.npz")
    np.savez(tmp_path / "flat.npz", images=x, labels=np.array([0, 1] * 3), class_names=np.array([["x", "y"]]))
    with pytest.raises(DataSourceError, match=r"class_names must be a 1-D array of names, got shape \(1, 2\)"):
        load_splits(tmp_path / "flat.npz")
    np.savez(tmp_path / "twice.npz", images=x, labels=np.array([0, 1] * 3), class_names=np.array(["x", "x"]))
    with pytest.raises(DataSourceError, match=r"class_names repeats a name \(x\)"):
        load_splits(tmp_path / "twice.npz")


def test_fewer_than_two_classes_are_refused_everywhere(tmp_path, capsys):
    _folder(tmp_path / "one", {"only": 6})
    with pytest.raises(DataSourceError, match=r"one: 1 class \(only\); a classifier needs at least 2 classes"):
        load_splits(tmp_path / "one")
    np.savez(tmp_path / "one.npz", images=np.zeros((4, 4, 4), np.uint8), labels=np.zeros(4, np.int64))
    with pytest.raises(DataSourceError, match=r"one\.npz: 1 class \(0\)"):
        load_splits(tmp_path / "one.npz")
    (tmp_path / "one.jsonl").write_text("".join(json.dumps({"path": f"one/only/{i}.png", "labels": ["x"]}) + "\n"
                                                for i in range(3)))
    with pytest.raises(DataSourceError, match=r"one\.jsonl: 1 class over all rows \(x\); training needs at least 2"):
        read_multi_label_manifest(tmp_path / "one.jsonl")
    with ShardWriter(tmp_path / "shards", ["x"]) as w:
        w.write("k0", (tmp_path / "one" / "only" / "0.png").read_bytes(), [0])
    with pytest.raises(DataSourceError, match=r"shards: 1 class \(x\); training needs at least 2"):
        load_pretrain_data(tmp_path / "shards")
    run = tmp_path / "run"
    assert main(["finetune", "--data", str(tmp_path / "one"), "--out", str(run), *F]) == 2
    assert "a classifier needs at least 2 classes" in capsys.readouterr().err
    assert not (run / "checkpoint.safetensors").exists()
    assert main(["evaluate", "knn", "--data", str(tmp_path / "one"), "--model", "R14x0.5", "--out",
                 str(tmp_path / "knn")]) == 2
    assert "a classifier needs at least 2 classes" in capsys.readouterr().err


def test_confusion_report_is_bounded_and_matches_hand_counts():
    y, p = np.array([0, 0, 1, 2, 2, 2, 3]), np.array([0, 1, 1, 0, 0, 2, 3])
    small = confusion_report(y, p, 5)
    assert small["confusion"] == confusion_matrix(y, p, 5).tolist()
    assert small["per_class_accuracy"] == [0.5, 1.0, 1 / 3, 1.0, None]
    assert small["top_confusions"] == [{"true": 2, "predicted": 0, "count": 2}, {"true": 0, "predicted": 1, "count": 1}]
    big = 100_001  # a (C, C) int64 matrix would be 74.5 GiB
    ev = Evaluation(big)
    logits = torch.zeros(3, big)
    logits[0, 7], logits[1, 99_999], logits[2, 100_000] = 1.0, 1.0, 1.0
    ev.update(logits, torch.tensor([7, 100_000, 100_000]))
    r = ev.result()
    assert r["confusion"] is None and big > CONFUSION_MAX_CLASSES and r["top1"] == pytest.approx(2 / 3)
    assert r["top_confusions"] == [{"true": 100_000, "predicted": 99_999, "count": 1}]
    assert r["per_class_accuracy"][7] == 1.0 and r["per_class_accuracy"][100_000] == 0.5
    assert sum(a is not None for a in r["per_class_accuracy"]) == 2


# ---- item 11: a manifest listing an image twice ------------------------------------------------------------------

def test_repeated_manifest_rows_are_refused_with_their_lines(tmp_path):
    _folder(tmp_path / "img", {"a": 3, "b": 3})
    os.symlink(tmp_path / "img" / "a" / "1.png", tmp_path / "img" / "alias.png")
    rows = ["path,label,split", "img/a/0.png,a,train", "img/a/1.png,a,train", "img/b/0.png,b,train",
            "img/b/1.png,b,train", "./img/a/0.png,a,val", "img/alias.png,a,train"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataSourceError, match=r"m\.csv: 2 rows list an image an earlier row already lists .*: line 6 "
                                              r"repeats line 2 \(.*img/a/0\.png\); line 7 repeats line 3"):
        load_splits(tmp_path / "m.csv")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"path": p, "labels": [c]}) + "\n" for p, c in
                                              [("img/a/0.png", "a"), ("img/b/0.png", "b"), ("img/a/0.png", "b")]))
    with pytest.raises(DataSourceError, match=r"m\.jsonl: 1 row list.*line 3 repeats line 1"):
        read_multi_label_manifest(tmp_path / "m.jsonl")


# ---- item 12: degenerate arrays ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,dtype,message", [
    ((8, 0, 0, 3), np.uint8, r"images has shape \(8, 0, 0, 3\): images of zero height or width"),
    ((8, 4, 0), np.uint8, r"images has shape \(8, 4, 0\): images of zero height or width"),
    ((8, 4, 4, 2), np.uint8, r"images must have shape \(N, H, W\) or \(N, H, W, 1\|3\|4\), got \(8, 4, 4, 2\)"),
    ((8, 4, 4, 3, 1), np.uint8, r"images must have shape .*, got \(8, 4, 4, 3, 1\)"),
    ((8, 16), np.uint8, r"images must have shape .*, got \(8, 16\)"),
    ((8, 4, 4, 3), np.float32, r"images must be uint8 pixels 0-255, got float32"),
    ((8, 4, 4, 3), np.int64, r"images must be uint8 pixels 0-255, got int64"),
])
def test_degenerate_npz_images_are_refused_naming_file_and_shape(tmp_path, shape, dtype, message):
    np.savez(tmp_path / "bad.npz", images=np.zeros(shape, dtype), labels=np.array([0, 1] * 4))
    with pytest.raises(DataSourceError, match=r"bad\.npz: " + message):
        load_splits(tmp_path / "bad.npz")


def test_zero_size_npz_images_stop_finetune_before_training(tmp_path, capsys):
    np.savez(tmp_path / "zero.npz", images=np.zeros((8, 0, 0, 3), np.uint8), labels=np.array([0, 1] * 4))
    assert main(["finetune", "--data", str(tmp_path / "zero.npz"), "--out", str(tmp_path / "run"), *F]) == 2
    assert "zero.npz: images has shape (8, 0, 0, 3)" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


# ---- weak items: decompression bombs, JSONL label types -------------------------------------------------------------

def _png_header_only(path, width, height):
    """A PNG that declares width x height but holds no pixel data: Pillow reads its size without decoding."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return path


def test_images_over_the_pixel_limit_are_named_and_skipped_undecoded(tmp_path):
    _folder(tmp_path, {"a": 3, "b": 3})
    huge = _png_header_only(tmp_path / "a" / "huge.png", 20000, 20000)  # over 2x the limit: Pillow's own error
    big = _png_header_only(tmp_path / "b" / "big.png", 11000, 10000)  # between 1x and 2x: this package's check
    with pytest.raises(ImageError) as e:
        open_rgb(huge)
    assert e.value.path == str(huge) and "too large to decode (400,000,000 pixels; the limit is" in e.value.reason
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageError) as e:
        open_rgb(big)
    assert e.value.path == str(big) and "too large to decode (11000x10000 = 110,000,000 pixels" in e.value.reason
    assert "MAX_PIXELS = 100,000,000 pixels" in e.value.reason
    s = load_splits(tmp_path)
    assert sorted(Path(x.path).name for x in s.skipped) == ["big.png", "huge.png"] and len(s.train + s.eval) == 6
    assert "too large to decode" in s.summary()


def test_the_pixel_limit_is_one_named_constant(tmp_path, monkeypatch):
    path = _png(tmp_path / "p.png", size=(30, 20))
    assert open_rgb(path).size == (30, 20)
    monkeypatch.setattr(images, "MAX_PIXELS", 599)
    with pytest.raises(ImageError, match=r"30x20 = 600 pixels; the limit is bigtransfer.data.images.MAX_PIXELS = 599"):
        open_rgb(path)


@pytest.mark.parametrize("label", ["1.0", "true", "[1, 2]", '{"a": 1}', "null"])
def test_jsonl_labels_must_be_strings_or_integers(tmp_path, label):
    _folder(tmp_path / "img", {"a": 2})
    rows = ['{"path": "img/a/0.png", "label": 1}', '{"path": "img/a/1.png", "label": ' + label + "}"]
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataSourceError, match=r"m\.jsonl, line 2: (needs a non-empty|'label' must be a string or an "
                                              r"integer, got)"):
        load_splits(tmp_path / "m.jsonl")


def test_jsonl_integer_and_string_labels_name_the_same_class(tmp_path):
    _folder(tmp_path / "img", {"a": 2, "b": 2})
    rows = [("img/a/0.png", 1), ("img/a/1.png", "1"), ("img/b/0.png", 2), ("img/b/1.png", "2")]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"path": p, "label": c}) + "\n" for p, c in rows))
    assert load_splits(tmp_path / "m.jsonl").classes == ["1", "2"]
    multi = [("img/a/0.png", ["x", 1]), ("img/b/0.png", [2]), ("img/b/1.png", ["x", True])]
    (tmp_path / "ml.jsonl").write_text("".join(json.dumps({"path": p, "labels": c}) + "\n" for p, c in multi))
    with pytest.raises(DataSourceError, match=r"ml\.jsonl, line 3: 'labels' must be a list of class names"):
        read_multi_label_manifest(tmp_path / "ml.jsonl")
    (tmp_path / "ml.jsonl").write_text("".join(json.dumps({"path": p, "labels": c}) + "\n" for p, c in multi[:2]))
    assert read_multi_label_manifest(tmp_path / "ml.jsonl", holdout=0.5).classes == ["1", "2", "x"]
    rows = [("img/a/0.png", ["x", 1], "train"), ("img/b/0.png", [2], "train"), ("img/b/1.png", ["y"], "val")]
    (tmp_path / "ml.jsonl").write_text("".join(json.dumps({"path": p, "labels": c, "split": s}) + "\n"
                                               for p, c, s in rows))
    data = read_multi_label_manifest(tmp_path / "ml.jsonl")
    assert "WARNING: 1 classes occur only in val/test rows, never in training: y" in data.summary()


def test_shard_labels_must_be_integers(tmp_path):
    png = _png(tmp_path / "x.png").read_bytes()
    with ShardWriter(tmp_path / "s", ["a", "b"]) as w:
        for bad in ([1.0], [True]):
            with pytest.raises(ShardError, match=r"labels \[.*\] must be integers"):
                w.write("k", png, bad)
        w.write("k", png, [np.int64(1)])
    assert read_index(tmp_path / "s").num_samples == 1


def test_vtab_notes_test_classes_that_training_never_sees(tmp_path):
    from bigtransfer.evaluation.vtab_tasks import read_vtab

    _folder(tmp_path / "dtd" / "train800", {"banded": 2, "woven": 2})
    _folder(tmp_path / "dtd" / "val200", {"banded": 1, "woven": 1})
    _folder(tmp_path / "dtd" / "test", {"banded": 1, "dotted": 1, "woven": 1})
    notes = read_vtab(tmp_path, tasks=["dtd"]).tasks[0].notes
    assert "1 classes of test have no train800val200 example (their images count as errors): dotted" in notes
    assert not any("of val200" in n for n in notes)


def test_unused_val_rows_add_no_class_and_unreadable_test_images_are_counted(tmp_path):
    _folder(tmp_path / "img", {"a": 3, "b": 3, "c": 2, "d": 1})
    (tmp_path / "img" / "c" / "0.png").write_bytes(b"junk")
    rows = ["path,label,split", *(f"img/{c}/{i}.png,{c},train" for c in "ab" for i in range(2)),
            "img/a/2.png,a,test", "img/b/2.png,b,test", "img/c/0.png,c,test", "img/d/0.png,d,val"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataSourceError, match=r"1 of 3 classes have no usable image at all: c \(1 unreadable\)"):
        load_splits(tmp_path / "m.csv")  # d (only in the unused val rows) is no class of this run
    (tmp_path / "m.csv").write_text("\n".join(rows[:-2] + rows[-1:]) + "\n")
    assert load_splits(tmp_path / "m.csv").classes == ["a", "b"]
