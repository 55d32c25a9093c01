"""tools/add_glyph_views.py and tools/add_photo_views.py: views appended to a packed corpus (BiT-Mini's A/B data)."""

from __future__ import annotations

import io
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFont

from bigtransfer.cli import main as cli
from bigtransfer.data.packed import open_packed
from bigtransfer.data.shards import ShardWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import add_glyph_views  # noqa: E402  (scripts beside the package, not part of it)
import add_photo_views  # noqa: E402

# Two glyph classes (a digit and a letter), their script, a font label, and a class that is not a glyph.
CLASSES = ["font:pillow", "glyph:U+0037 digit seven", "glyph:U+0041 latin capital letter a", "icon:star",
           "script:latin"]
ROWS = [[0, 1], [3], [0, 2, 4], [0, 1]]


@pytest.fixture()
def corpus(tmp_path):
    """A packed corpus of four 64 px rows, and a folder holding Pillow's own scalable font as a file."""
    for split in ("train", "val"):
        with ShardWriter(tmp_path / "corpus" / split, CLASSES, prefix=split) as w:
            for k, labels in enumerate(ROWS):
                buf = io.BytesIO()
                Image.new("RGB", (64, 64), (40 * k, 90, 200)).save(buf, format="PNG")
                w.write(f"s{k}", buf.getvalue(), labels)
    assert cli(["pack", str(tmp_path / "corpus"), str(tmp_path / "packed")]) == 0
    fonts = tmp_path / "fonts"
    fonts.mkdir()
    (fonts / "pillow.ttf").write_bytes(ImageFont.load_default(size=16).font_bytes)
    return tmp_path / "packed", fonts


def test_views_are_appended_with_identity_labels_and_the_corpus_is_kept(corpus, tmp_path):
    src, fonts = corpus
    dst = tmp_path / "more"
    assert add_glyph_views.main([str(src), str(dst), "--views", "3", "--ascii-extra", "2", "--fonts", str(fonts)]) == 0
    before, after = open_packed(src / "train"), open_packed(dst / "train")
    assert after.classes == CLASSES and len(after) == 4 + 2 * (3 + 2)  # "7" and "A" are both ASCII
    assert np.array_equal(after.images[:4], before.images) and [after.labels(i) for i in range(4)] == ROWS
    assert [after.labels(i) for i in range(4, 14)] == [[1]] * 5 + [[2]] * 5  # class order, the character only
    new = after.images[4:].astype(int)
    assert (new[..., 0] == new[..., 1]).all() and (new[..., 1] == new[..., 2]).all()  # grey
    assert all(np.ptp(v) > 100 for v in new)  # ink against ground, not a blank image
    assert np.array_equal(open_packed(dst / "val").images, open_packed(src / "val").images)
    meta = json.loads((dst / "train" / "packed.json").read_text())
    assert "tools/add_glyph_views.py --views 3 --ascii-extra 2 --labels identity --seed 4" in meta["source"]
    # The same seed and fonts draw the same views; the corpus's labels minus the font with --labels corpus.
    again = tmp_path / "again"
    assert add_glyph_views.main([str(src), str(again), "--views", "3", "--ascii-extra", "2", "--fonts", str(fonts),
                                 "--labels", "corpus", "--only-new"]) == 0
    redrawn = open_packed(again / "train")
    assert np.array_equal(redrawn.images, after.images[4:])
    assert [redrawn.labels(i) for i in range(10)] == [[1]] * 5 + [[2, 4]] * 5


def test_an_existing_output_or_no_font_is_refused_and_nothing_is_left(corpus, tmp_path):
    src, fonts = corpus
    with pytest.raises(SystemExit, match="already exists"):
        add_glyph_views.main([str(src), str(src), "--fonts", str(fonts)])
    with pytest.raises(SystemExit, match="no usable font file"):
        add_glyph_views.main([str(src), str(tmp_path / "x"), "--fonts", str(tmp_path / "none")])
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))
    assert cli(["pack", str(tmp_path / "corpus"), str(tmp_path / "small"), "--size", "32"]) == 0
    with pytest.raises(SystemExit, match=r"small/train: holds 32x32 images; the views are 64x64"):
        add_glyph_views.main([str(tmp_path / "small"), str(tmp_path / "x"), "--fonts", str(fonts)])


# ---------------------------------------------------------------- tools/add_photo_views.py

CELL_COLOURS = [(30 * k + 10, 250 - 25 * k, (97 * k) % 256) for k in range(9)]  # nine distinct flat colours


def gimp_pattern(pixels: np.ndarray) -> bytes:
    """A GIMP .pat file written by hand from its documented layout: big-endian header, name, raw pixels."""
    name = b"t\0"
    h, w, depth = pixels.shape
    return struct.pack(">5I", 24 + len(name), 1, w, h, depth) + b"GPAT" + name + pixels.tobytes()


@pytest.fixture()
def pictures(tmp_path):
    """A KDE-style wallpaper at two sizes plus its screenshot, a photo and a copy of it, a texture tile."""
    root = tmp_path / "pics"
    grid = np.zeros((300, 300, 3), np.uint8)  # a 3x3 grid of flat colours: a view's cell can be checked
    for k, colour in enumerate(CELL_COLOURS):
        grid[100 * (k // 3):100 * (k // 3 + 1), 100 * (k % 3):100 * (k % 3 + 1)] = colour
    images = root / "Grid" / "contents" / "images"
    images.mkdir(parents=True)
    Image.fromarray(grid).save(images / "300x300.png")
    Image.fromarray(grid).resize((60, 60)).save(images / "60x60.png")
    Image.fromarray(grid).save(root / "Grid" / "contents" / "screenshot.png")
    ramp = np.repeat(np.linspace(0, 255, 400, dtype=np.uint8)[None, :, None], 300, 0).repeat(3, 2)
    Image.fromarray(ramp).save(root / "sunset.png")
    Image.fromarray(ramp).save(root / "sunset-copy.png")
    rng = np.random.default_rng(0)
    (root / "stone.pat").write_bytes(gimp_pattern(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    return root


def test_gimp_patterns_are_read_pixel_for_pixel(tmp_path):
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    (tmp_path / "a.pat").write_bytes(gimp_pattern(pixels))
    assert np.array_equal(np.asarray(add_photo_views.read_gimp_pattern(tmp_path / "a.pat")), pixels)
    grey = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
    (tmp_path / "g.pat").write_bytes(gimp_pattern(grey))
    assert np.array_equal(np.asarray(add_photo_views.read_gimp_pattern(tmp_path / "g.pat")), grey[..., 0])
    (tmp_path / "bad.pat").write_bytes(gimp_pattern(pixels)[:-5])
    with pytest.raises(ValueError, match="bad.pat: .*truncated"):
        add_photo_views.read_gimp_pattern(tmp_path / "bad.pat")


def test_photo_views_add_a_class_per_picture_and_per_grid_cell(corpus, pictures, tmp_path):
    src, _ = corpus
    dst = tmp_path / "photos"
    assert add_photo_views.main([str(src), str(dst), "--views", "40", "--roots", str(pictures)]) == 0
    after = open_packed(dst / "train")
    new = after.classes[len(CLASSES):]
    # Three pictures: the wallpaper once (not its smaller copy or screenshot), the photo once, the texture.
    assert after.classes[:len(CLASSES)] == CLASSES and len(after) == 4 + 3 * 40
    assert {c for c in new if "@" not in c} == {"photo:Grid", "photo:stone", "photo:sunset"}
    assert open_packed(dst / "val").classes == after.classes  # the held-out set speaks the same class list
    assert np.array_equal(after.images[:4], open_packed(src / "train").images)
    labels = [[after.classes[j] for j in after.labels(i)] for i in range(4, len(after))]
    grid_rows = [i for i, names in enumerate(labels, 4) if names[0] == "photo:Grid"]
    assert len(grid_rows) == 40 and all(len(labels[i - 4]) == 2 for i in grid_rows)
    assert all(names == ["photo:stone"] for names in labels if names[0] == "photo:stone")  # a texture: no cells
    # The labelled cell is the one under the view's centre: check every view whose centre shows a flat colour.
    checked = 0
    for i in grid_rows:
        centre = tuple(int(v) for v in after.images[i][32, 32])
        if centre in CELL_COLOURS:
            k = CELL_COLOURS.index(centre)
            assert labels[i - 4][1] == f"photo:Grid@{k // 3},{k % 3}"
            checked += 1
    assert checked >= 20
    # The same files and seed give the same views.
    again = tmp_path / "again"
    assert add_photo_views.main([str(src), str(again), "--views", "40", "--roots", str(pictures), "--only-new"]) == 0
    assert np.array_equal(open_packed(again / "train").images, after.images[4:])


def test_photo_views_refuse_an_empty_root_and_leave_nothing(corpus, tmp_path):
    src, _ = corpus
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no picture under"):
        add_photo_views.main([str(src), str(tmp_path / "x"), "--roots", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="already exists"):
        add_photo_views.main([str(src), str(src), "--roots", str(tmp_path / "empty")])
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))


def test_a_picture_drawn_in_its_alpha_keeps_its_pattern(corpus, tmp_path):
    """MATE's stripes are one RGB colour with the pattern in the alpha channel: drawn over grey, not made flat."""
    src, _ = corpus
    root = tmp_path / "alpha"
    root.mkdir()
    rgba = np.zeros((300, 300, 4), np.uint8)
    rgba[..., :3] = 255
    for k in range(6):  # white stripes, 6 columns in 20 (wide enough to survive a crop's downscaling), elsewhere clear
        rgba[:, k::20, 3] = 255
    Image.fromarray(rgba, "RGBA").save(root / "stripes.png")
    Image.new("RGB", (300, 300), (90, 90, 90)).save(root / "flat.png")  # one colour: no picture to learn
    dst = tmp_path / "out"
    assert add_photo_views.main([str(src), str(dst), "--views", "8", "--roots", str(root)]) == 0
    after = open_packed(dst / "train")
    assert "photo:stripes" in after.classes and "photo:flat" not in after.classes
    views = after.images[4:].astype(int)
    assert len(views) == 8 and all(v.max() - v.min() > 60 for v in views)  # white stripes against the grey


def test_photo_views_make_a_single_label_set_multi_label(corpus, pictures, tmp_path):
    src, _ = corpus
    with ShardWriter(tmp_path / "single" / "train", CLASSES, prefix="train", multi_label=False) as w:
        for k in range(2):
            buf = io.BytesIO()
            Image.new("RGB", (64, 64), (100 * k, 0, 0)).save(buf, format="PNG")
            w.write(f"s{k}", buf.getvalue(), [k])
    assert cli(["pack", str(tmp_path / "single"), str(tmp_path / "packed1")]) == 0
    assert not open_packed(tmp_path / "packed1" / "train").multi_label
    dst = tmp_path / "photos"
    assert add_photo_views.main([str(tmp_path / "packed1"), str(dst), "--views", "3", "--roots", str(pictures)]) == 0
    assert open_packed(dst / "train").multi_label  # a crop's picture and its grid cell: two labels


def test_a_failure_while_writing_leaves_nothing_and_bad_counts_are_refused(corpus, pictures, tmp_path, monkeypatch):
    src, _ = corpus

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(add_glyph_views.np, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        add_photo_views.main([str(src), str(tmp_path / "x"), "--views", "3", "--roots", str(pictures)])
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))
    monkeypatch.undo()
    for bad in ("0", "-2"):
        with pytest.raises(SystemExit) as stop:
            add_photo_views.main([str(src), str(tmp_path / "x"), "--views", bad, "--roots", str(pictures)])
        assert stop.value.code == 2
    # The preview draws a grid from however few views there are, and writes no corpus.
    assert add_photo_views.main([str(src), str(tmp_path / "x"), "--roots", str(pictures), "--preview",
                                 str(tmp_path / "grid.png")]) == 0
    assert Image.open(tmp_path / "grid.png").size == (12 * 64, 64) and not (tmp_path / "x").exists()
