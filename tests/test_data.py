"""Data sources, checking, splits, K-shot subsets, transforms and the step-indexed sampler, on tiny generated images."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from bigtransfer.data.datasets import (
    DataSourceError,
    ImageDataset,
    Item,
    batch_indices,
    eval_transform,
    image_size_of,
    load_splits,
    make_loader,
    sample_seed,
    train_transform,
)
from bigtransfer.data.sampling import StepSampler


def _png(path, size=(12, 10), color=(200, 30, 60), mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def _folder(root, counts, size=(12, 10)):
    """root/<class>/<i>.png with counts[class] images each; pixel colour encodes (class, i)."""
    for c, (name, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            _png(root / name / f"{i:02d}.png", size, (c * 40, i * 10, 100))
    return root


def _sources(items):
    return sorted(i.source for i in items)


# ---- sources ----------------------------------------------------------------------------------------------------

def test_image_folder_with_stratified_split(tmp_path):
    _folder(tmp_path, {"cat": 5, "dog": 3, "eel": 1, "ant": 10})
    s = load_splits(tmp_path, seed=0)
    assert s.classes == ["ant", "cat", "dog", "eel"] and s.eval_name == "split"
    per_class_eval = {c: sum(1 for i in s.eval if i.label == k) for k, c in enumerate(s.classes)}
    # round(0.2 n) half up, at least 1 for n >= 2, none for a single image
    assert per_class_eval == {"ant": 2, "cat": 1, "dog": 1, "eel": 0}
    assert len(s.train) + len(s.eval) == 19
    assert not set(_sources(s.train)) & set(_sources(s.eval))
    for item in s.train + s.eval:  # label index matches the folder name
        assert f"/{s.classes[item.label]}/" in item.source
    assert s.skipped == [] and s.ignored == 0
    assert "4 classes (ant, cat, dog, eel); train: 15 images (1-8 per class); held-out split of train: 4 images" \
        in s.summary()


def test_stratified_split_is_seeded(tmp_path):
    _folder(tmp_path, {"a": 10, "b": 10})
    one, again, other = (load_splits(tmp_path, seed=s, check_images=False) for s in (1, 1, 2))
    assert _sources(one.eval) == _sources(again.eval)
    assert _sources(one.eval) != _sources(other.eval)
    assert [sum(1 for i in one.eval if i.label == k) for k in (0, 1)] == [2, 2]
    fixed = [load_splits(tmp_path, seed=s, split_seed=7, check_images=False) for s in (1, 2)]
    assert _sources(fixed[0].eval) == _sources(fixed[1].eval)


def test_train_val_folders_share_class_indices(tmp_path):
    _folder(tmp_path / "train", {"a": 3, "b": 2})
    _folder(tmp_path / "val", {"b": 2, "c": 1})
    s = load_splits(tmp_path)
    assert s.eval_name == "val" and s.classes == ["a", "b", "c"]
    assert len(s.train) == 5 and len(s.eval) == 3
    assert {s.classes[i.label] for i in s.eval} == {"b", "c"}
    assert all(f"/val/{s.classes[i.label]}/" in i.source for i in s.eval)


def test_train_val_test_folders_score_on_test(tmp_path):
    _folder(tmp_path / "train", {"a": 2, "b": 2})
    _folder(tmp_path / "val", {"a": 1, "b": 1})
    assert load_splits(tmp_path).eval_name == "val"  # val alone: the only evaluation split there is
    _folder(tmp_path / "test", {"a": 2, "b": 1})
    s = load_splits(tmp_path)
    # Both: the score comes from test (spec section 5); val's 2 images are counted as not used.
    assert s.eval_name == "test" and len(s.eval) == 3 and all("/test/" in i.source for i in s.eval)
    assert s.unused == {"val": 2} and "the 2 val examples are not used" in s.summary()
    v = load_splits(tmp_path, prefer="val")  # pre-training's held-out look
    assert v.eval_name == "val" and len(v.eval) == 2 and v.unused == {"test": 3}


def test_manifest_and_npz_with_val_and_test_score_on_test(tmp_path):
    for i in range(7):
        _png(tmp_path / "img" / f"{i}.png")
    splits = ["train", "train", "train", "train", "val", "test", "test"]
    rows = "path,label,split\n" + "".join(f"img/{i}.png,{'ab'[i % 2]},{sp}\n" for i, sp in enumerate(splits))
    (tmp_path / "m.csv").write_text(rows)
    s = load_splits(tmp_path / "m.csv")
    assert s.eval_name == "test" and sorted(i.source[-5:] for i in s.eval) == ["5.png", "6.png"]
    assert s.unused == {"val": 1}
    x = np.zeros((4, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "d.npz", images=x, labels=np.array([0, 1, 0, 1]), val_images=x[:2], val_labels=np.array([0, 1]),
             test_images=x[:3], test_labels=np.array([1, 0, 1]))
    s = load_splits(tmp_path / "d.npz")
    assert s.eval_name == "test" and [i.label for i in s.eval] == [0, 1, 1] and s.unused == {"val": 2}
    assert all("#test_images:" in i.source for i in s.eval)


def test_csv_manifest_relative_paths_and_natural_class_order(tmp_path):
    for i in range(5):
        _png(tmp_path / "img" / f"{i}.png")
    rows = "path,label\n" + "".join(f"img/{i}.png,{lab}\n" for i, lab in enumerate(["10", "2", "2", "10", "1"]))
    (tmp_path / "m.csv").write_text(rows)
    s = load_splits(tmp_path / "m.csv", check_images=True)
    assert s.classes == ["1", "2", "10"]
    assert {(i.source.split("/")[-1], s.classes[i.label]) for i in s.train + s.eval} == {
        ("0.png", "10"), ("1.png", "2"), ("2.png", "2"), ("3.png", "10"), ("4.png", "1")}
    assert all(i.source.startswith(str(tmp_path / "img")) for i in s.train)


def test_jsonl_manifest_with_split_column(tmp_path):
    lines = []
    for i, (label, split) in enumerate([("cat", "train"), ("dog", "train"), ("cat", "val"), ("dog", "validation")]):
        _png(tmp_path / f"{i}.png")
        lines.append(json.dumps({"path": f"{i}.png", "label": label, "split": split}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n\n")
    s = load_splits(tmp_path / "m.jsonl")
    assert s.eval_name == "val" and s.classes == ["cat", "dog"]
    assert [i.source[-5:] for i in s.train] == ["0.png", "1.png"]
    assert [i.source[-5:] for i in s.eval] == ["2.png", "3.png"]


def test_manifest_errors_name_the_file_and_line(tmp_path):
    (tmp_path / "a.csv").write_text("file,class\nx.png,1\n")
    with pytest.raises(DataSourceError, match=r"a\.csv: CSV header must have columns 'path' and 'label'"):
        load_splits(tmp_path / "a.csv")
    (tmp_path / "b.jsonl").write_text('{"path": "x.png", "label": 1}\n{oops\n')
    with pytest.raises(DataSourceError, match=r"b\.jsonl, line 2: not valid JSON"):
        load_splits(tmp_path / "b.jsonl")
    (tmp_path / "c.csv").write_text("path,label\nx.png,\n")
    with pytest.raises(DataSourceError, match=r"c\.csv, line 2: needs a non-empty 'path' and 'label'"):
        load_splits(tmp_path / "c.csv")


def test_npz_arrays_with_class_names_and_test_split(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 9, 7, 3), dtype=np.uint8)
    test_images = rng.integers(0, 256, (2, 9, 7, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([0, 1, 2, 0, 1, 2]),
             class_names=np.array(["x", "y", "z"]), test_images=test_images, test_labels=np.array([2, 0]))
    s = load_splits(tmp_path / "d.npz")
    assert s.classes == ["x", "y", "z"] and s.eval_name == "test"
    assert len(s.train) == 6 and [i.label for i in s.eval] == [0, 2]
    ds = ImageDataset(s.train + s.eval, eval_transform(crop=9))  # wrong aspect on purpose: squash to 9x9
    assert ds[0][0].shape == (3, 9, 9)
    exact = ImageDataset(s.train + s.eval, lambda img, g: torch.from_numpy(np.asarray(img).copy()))
    for k, item in enumerate(s.train + s.eval):
        arr = test_images if "test_images" in item.source else images
        row = int(item.source.rsplit(":", 1)[-1].rsplit("#", 1)[-1])
        assert torch.equal(exact[k][0], torch.from_numpy(arr[row])) and exact[k][1] == item.label
    assert image_size_of(s) == (9, 7)


def test_npz_greyscale_and_errors(tmp_path):
    np.savez(tmp_path / "g.npz", images=np.full((4, 5, 5), 51, np.uint8), labels=np.array([0, 1, 0, 1]))
    s = load_splits(tmp_path / "g.npz")
    assert s.classes == ["0", "1"] and s.eval_name == "split"
    x, _ = ImageDataset(s.train, eval_transform(5))[0]
    assert x.shape == (3, 5, 5) and torch.allclose(x, torch.full_like(x, 51 / 127.5 - 1))
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 4, 4), np.float32), labels=np.array([0, 1]))
    with pytest.raises(DataSourceError, match=r"f\.npz: images must be uint8"):
        load_splits(tmp_path / "f.npz")
    np.savez(tmp_path / "n.npz", images=np.zeros((2, 4, 4), np.uint8), labels=np.array([0, 1, 2]))
    with pytest.raises(DataSourceError, match=r"n\.npz: 2 images but 3 labels"):
        load_splits(tmp_path / "n.npz")
    np.savez(tmp_path / "k.npz", pixels=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataSourceError, match=r"k\.npz: needs arrays 'images' and 'labels'"):
        load_splits(tmp_path / "k.npz")


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(DataSourceError, match="nope: no such file or folder"):
        load_splits(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataSourceError, match=r"x\.txt: not a dataset"):
        load_splits(tmp_path / "x.txt")
    (tmp_path / "flat").mkdir()
    _png(tmp_path / "flat" / "a.png")
    with pytest.raises(DataSourceError, match="flat: no class sub-folders"):
        load_splits(tmp_path / "flat")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataSourceError, match="empty: no image files"):
        load_splits(tmp_path / "empty")


# ---- hostile files ----------------------------------------------------------------------------------------------

def _hostile(root):
    _folder(root, {"a": 3, "b": 3})
    (root / "a" / "empty.jpg").write_bytes(b"")
    good = _png(root / "a" / "big.png", (40, 40)).read_bytes()
    (root / "a" / "truncated.png").write_bytes(good[: len(good) // 2])
    buf = root / "b" / "whole.jpg"
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, quality=90)
    (root / "b" / "truncated.jpg").write_bytes(buf.read_bytes()[:600])
    buf.unlink()
    (root / "b" / "text.jpg").write_text("this is not a picture")
    _png(root / "b" / ".hidden.png")
    (root / "b" / "README.txt").write_text("notes")
    (root / "LICENSE").write_text("top-level file")
    return {"empty.jpg", "truncated.png", "truncated.jpg", "text.jpg"}


def test_unreadable_images_are_named_and_skipped(tmp_path):
    bad = _hostile(tmp_path)
    s = load_splits(tmp_path, workers=2)
    assert {x.path.rsplit("/", 1)[-1] for x in s.skipped} == bad
    reasons = {x.path.rsplit("/", 1)[-1]: x.reason for x in s.skipped}
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["text.jpg"].startswith("not an image")
    assert reasons["truncated.png"].startswith("cannot decode") and reasons["truncated.jpg"].startswith("cannot decode")
    kept = [i.source.rsplit("/", 1)[-1] for i in s.train + s.eval]
    assert not set(kept) & bad and "big.png" in kept and len(kept) == 7  # 3 + 3 generated + big.png
    assert s.ignored == 3  # .hidden.png, README.txt, LICENSE
    text = s.summary()
    assert "Skipped 4 unreadable images" in text and "Ignored 3 hidden or non-image files" in text
    for name in bad:
        assert name in text


def test_strict_refuses_naming_every_bad_file(tmp_path):
    bad = _hostile(tmp_path)
    with pytest.raises(ValueError, match="4 unreadable images") as e:
        load_splits(tmp_path, strict=True)
    for name in bad:
        assert name in str(e.value)


def test_dataset_survives_a_file_that_goes_bad_later(tmp_path, caplog):
    _folder(tmp_path, {"a": 2, "b": 2})
    s = load_splits(tmp_path)
    items = sorted(s.train + s.eval, key=lambda i: i.source)
    ds = ImageDataset(items, eval_transform(8))
    expected_next = ds[2]
    open(items[1].source, "wb").close()  # corrupted after the check
    with caplog.at_level(logging.WARNING, logger="bigtransfer.data.datasets"):
        x, y = ds[1]
        x2, y2 = ds[1]
    assert torch.equal(x, expected_next[0]) and y == expected_next[1] and torch.equal(x2, x)
    warnings = [r for r in caplog.records if items[1].source in r.getMessage()]
    assert len(warnings) == 1 and "empty file" in warnings[0].getMessage()


# ---- K-shot -----------------------------------------------------------------------------------------------------

def test_few_shot_subset_is_balanced_and_seeded(tmp_path):
    _folder(tmp_path / "train", {"a": 6, "b": 4, "c": 5})
    _folder(tmp_path / "val", {"a": 1, "b": 1, "c": 1})
    full = load_splits(tmp_path)
    picks = [load_splits(tmp_path, examples_per_class=3, seed=s) for s in (0, 0, 1, 2, 3)]
    for s in picks:
        assert [sum(1 for i in s.train if i.label == k) for k in range(3)] == [3, 3, 3]
        assert set(_sources(s.train)) <= set(_sources(full.train))
        assert _sources(s.eval) == _sources(full.eval)
    assert _sources(picks[0].train) == _sources(picks[1].train)
    assert len({tuple(_sources(p.train)) for p in picks[1:]}) > 1


def test_few_shot_error_names_short_classes(tmp_path):
    _folder(tmp_path / "train", {"ant": 5, "bee": 2, "cow": 4, "dog": 1})
    _folder(tmp_path / "val", {"ant": 1, "emu": 1})
    with pytest.raises(ValueError, match=r"examples_per_class=4: 3 of 5 classes have fewer than 4 usable training "
                                         r"images: bee \(2\), dog \(1\), emu \(0\)"):
        load_splits(tmp_path, examples_per_class=4)


def test_few_shot_counts_after_the_held_out_split(tmp_path):
    _folder(tmp_path, {"a": 5, "b": 10})
    with pytest.raises(ValueError, match=r"after holding out 20% per class for evaluation: a \(4\)"):
        load_splits(tmp_path, examples_per_class=5)
    assert len(load_splits(tmp_path, examples_per_class=4).train) == 8


# ---- transforms -------------------------------------------------------------------------------------------------

def _coded(h, w):
    """An RGB image whose pixel (y, x) is (10y + x, 100 + y, 200 - x): every crop and flip is recognisable."""
    a = np.zeros((h, w, 3), np.uint8)
    for y in range(h):
        for x in range(w):
            a[y, x] = (10 * y + x, 100 + y, 200 - x)
    return a


def test_train_crop_and_flip_match_hand_computation():
    a = _coded(6, 6)
    img = Image.fromarray(a)
    t = train_transform(precrop=6, crop=4)  # precrop = image size: the squash is the identity
    seen = set()
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        top, left = (int(v) for v in torch.randint(0, 3, (2,), generator=g))  # the documented draw order
        flipped = bool(torch.rand((), generator=g) < 0.5)
        want = a[top:top + 4, left:left + 4]
        want = want[:, ::-1] if flipped else want
        want = torch.from_numpy(want.copy()).permute(2, 0, 1).float() / 127.5 - 1
        got = t(img, torch.Generator().manual_seed(seed))
        assert torch.equal(got, want), seed
        seen.add((top, left, flipped))
    assert {f for *_, f in seen} == {True, False} and len(seen) > 4


def test_transform_shapes_and_range():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (13, 21, 3), dtype=np.uint8))
    x = train_transform(20, 16)(img, torch.Generator().manual_seed(0))
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    y = eval_transform(16)(img, None)
    assert y.shape == (3, 16, 16) and torch.equal(y, eval_transform(16)(img, torch.Generator()))
    black_white = Image.fromarray(np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8))
    assert eval_transform(1)(Image.fromarray(np.zeros((4, 4, 3), np.uint8))).unique().tolist() == [-1.0]
    assert train_transform(2, 2, flip=False)(black_white.resize((2, 2))).shape == (3, 2, 2)
    nocrop = train_transform(6, 4, flip=False, crop_ok=False)(img)
    assert torch.equal(nocrop, eval_transform(4)(img))
    with pytest.raises(ValueError):
        train_transform(4, 6)


@pytest.mark.parametrize("mode, fmt, value, rgb", [
    ("L", "PNG", 100, (100, 100, 100)),
    ("P", "GIF", 3, None),
    ("RGBA", "PNG", (10, 20, 30, 0), (255, 255, 255)),  # fully transparent over white
    ("CMYK", "JPEG", (0, 0, 0, 0), None),
    ("I;16", "PNG", 65535, (255, 255, 255)),
    ("LA", "PNG", (50, 255), (50, 50, 50)),
])
def test_every_colour_mode_becomes_rgb(tmp_path, mode, fmt, value, rgb):
    path = tmp_path / "c" / f"x.{fmt.lower()}"
    _png(path, (5, 4), value, mode=mode, fmt=fmt)
    _png(tmp_path / "d" / "y.png")
    s = load_splits(tmp_path)
    assert s.skipped == []
    item = next(i for i in s.train + s.eval if i.source == str(path))
    x, _ = ImageDataset([item], eval_transform(4))[0]
    assert x.shape == (3, 4, 4)
    if rgb is not None:
        assert torch.allclose(x, torch.tensor(rgb).float().view(3, 1, 1).div(127.5).sub(1).expand(3, 4, 4))


def test_image_size_of_is_the_median(tmp_path):
    for i, (w, h) in enumerate([(30, 10), (40, 20), (50, 30), (41, 21), (39, 19)]):
        for c in "ab":
            _png(tmp_path / c / f"{i}.png", (w, h))
    s = load_splits(tmp_path, check_images=False, val_fraction=0.01)  # 1 per class held out
    assert image_size_of(s, sample=64) in {(20, 40), (19, 39), (21, 41)}
    assert image_size_of(type(s)(s.train + s.eval, [], s.classes, "val")) == (20, 40)


# ---- sampling and loaders ---------------------------------------------------------------------------------------

def test_epochs_are_permutations_and_steps_are_independent():
    n, b = 10, 4
    stream = [i for step in range(5) for i in batch_indices(step, n, b, seed=3)]  # 20 positions = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]
    assert batch_indices(4, n, b, seed=3) == stream[16:]  # computed without replaying steps 0-3
    assert batch_indices(0, n, b, seed=4) != batch_indices(0, n, b, seed=3)


def test_sampling_with_replacement_when_micro_batch_outgrows_the_data():
    idx = batch_indices(0, 3, 8, seed=0)  # 8 > 3 examples
    assert len(idx) == 8 and set(idx) <= {0, 1, 2}
    assert batch_indices(0, 3, 8, seed=0) == idx and batch_indices(1, 3, 8, seed=0) != idx
    assert sorted(batch_indices(0, 6, 8, seed=0, micro_batch=2)[:6]) == list(range(6))  # micro 2 <= 6: epochs


def test_step_sampler_resumes_exactly():
    full = list(StepSampler(7, 6, seed=5, steps=6, batch_split=3))
    assert len(full) == 18 and all(len(mb) == 2 for mb in full)
    assert list(StepSampler(7, 6, seed=5, start_step=4, steps=6, batch_split=3)) == full[12:]
    step2 = [k for mb in full[6:9] for k in mb]
    assert [i for i, _ in step2] == batch_indices(2, 7, 6, seed=5, micro_batch=2)
    assert [s for _, s in step2] == [sample_seed(5, 2, j) for j in range(6)]
    with pytest.raises(ValueError, match="not divisible"):
        StepSampler(7, 6, seed=0, batch_split=4)


def test_loader_batches_are_a_function_of_seed_and_step(tmp_path):
    _folder(tmp_path, {"a": 4, "b": 4}, size=(10, 10))
    s = load_splits(tmp_path, check_images=False)
    ds = ImageDataset(s.train, train_transform(10, 8))
    full = list(make_loader(ds, 4, shuffle=True, seed=9, workers=0, steps=4, batch_split=2))
    resumed = list(make_loader(ds, 4, shuffle=True, seed=9, workers=1, start_step=2, steps=4, batch_split=2))
    assert len(full) == 8 and len(resumed) == 4
    for (xa, ya), (xb, yb) in zip(full[4:], resumed, strict=True):
        assert xa.shape == (2, 3, 8, 8) and torch.equal(xa, xb) and torch.equal(ya, yb)
    other = list(make_loader(ds, 4, shuffle=True, seed=10, workers=0, steps=1, batch_split=1))
    assert not torch.equal(other[0][0], torch.cat([full[0][0], full[1][0]]))


def test_eval_loader_is_one_ordered_pass(tmp_path):
    _folder(tmp_path, {"a": 3, "b": 2}, size=(6, 6))
    items = [Item(str(p), k) for k, c in enumerate("ab") for p in sorted((tmp_path / c).iterdir())]
    batches = list(make_loader(ImageDataset(items, eval_transform(6)), 2, shuffle=False, workers=0))
    labels = torch.cat([y for _, y in batches]).tolist()
    assert labels == [0, 0, 0, 1, 1] and [len(y) for _, y in batches] == [2, 2, 1]
    assert list(make_loader(ImageDataset([], eval_transform(6)), 2, shuffle=False, workers=0)) == []  # no eval images
