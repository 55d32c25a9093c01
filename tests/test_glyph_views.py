"""tools/add_glyph_views.py: plain glyph views appended to a packed corpus (BiT-Mini's A/B data)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFont

from bigtransfer.cli import main as cli
from bigtransfer.data.packed import open_packed
from bigtransfer.data.shards import ShardWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import add_glyph_views  # noqa: E402  (a script beside the package, not part of it)

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
