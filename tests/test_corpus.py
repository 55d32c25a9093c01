"""The upstream corpus: font character maps, icon-theme discovery, a tiny real build, interruption safety."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from bigtransfer.cli import main
from bigtransfer.corpus import build as corpus
from bigtransfer.corpus.build import CorpusConfig, CorpusError, build_corpus, select
from bigtransfer.corpus.fonts import FontError, builtin_font, find_fonts, font_codepoints
from bigtransfer.corpus.sources import emoji_candidates, icon_candidates
from bigtransfer.data.shards import ShardDataset, iter_shard, read_index

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- cmap

def sfnt(subtables: list[tuple[int, int, bytes]]) -> bytes:
    """A minimal TrueType file holding only a cmap table with the given (platform, encoding, body) subtables."""
    head = struct.pack(">HH", 0, len(subtables))
    offset = 4 + 8 * len(subtables)
    records, bodies = b"", b""
    for platform, encoding, body in subtables:
        records += struct.pack(">HHI", platform, encoding, offset + len(bodies))
        bodies += body
    cmap = head + records + bodies
    return struct.pack(">IHHHH", 0x00010000, 1, 16, 0, 0) + b"cmap" + struct.pack(">III", 0, 28, len(cmap)) + cmap


def format4() -> bytes:
    """A->C through idDelta; a..c through glyphIdArray, where 'b' maps to glyph 0 (missing); the 0xFFFF end."""
    ends, starts, deltas, range_offsets = [0x43, 0x63, 0xFFFF], [0x41, 0x61, 0xFFFF], [-0x40, 0, 1], [0, 4, 0]
    arrays = (struct.pack(">3H", *ends) + b"\0\0" + struct.pack(">3H", *starts) + struct.pack(">3h", *deltas)
              + struct.pack(">3H", *range_offsets) + struct.pack(">3H", 5, 0, 7))
    return struct.pack(">HHHHHHH", 4, 14 + len(arrays), 0, 6, 4, 1, 2) + arrays


def format12(groups: list[tuple[int, int, int]]) -> bytes:
    return struct.pack(">HHIII", 12, 0, 16 + 12 * len(groups), 0, len(groups)) + b"".join(
        struct.pack(">III", *g) for g in groups)


def test_cmap_reader_on_hand_built_fonts():
    assert font_codepoints(sfnt([(3, 1, format4())])) == {0x41, 0x42, 0x43, 0x61, 0x63}
    both = sfnt([(3, 1, format4()), (3, 10, format12([(0x41, 0x42, 1), (0x1F600, 0x1F601, 10)]))])
    assert font_codepoints(both) == {0x41, 0x42, 0x1F600, 0x1F601}  # the full-Unicode table wins
    with pytest.raises(FontError, match="broken.ttf: truncated or corrupt"):
        font_codepoints(both[:60], name="broken.ttf")
    with pytest.raises(FontError, match="x.ttf: no Unicode character map"):
        font_codepoints(sfnt([(3, 0, format4())]), name="x.ttf")


def test_cmap_reader_agrees_with_freetype_on_pillows_font():
    font = builtin_font()
    face = ImageFont.truetype(io.BytesIO(font.source), 24, layout_engine=ImageFont.Layout.BASIC)

    def drawn(ch: str) -> tuple:
        mask = face.getmask(ch)
        return mask.size, bytes(mask)

    missing = drawn(chr(0x10FFFD))  # FreeType draws glyph 0 for characters the font lacks
    # Basic Latin to CJK symbols, and the Latin ligatures block (Pillow's font has fi and fl there).
    draws = {cp for cp in [*range(32, 0x3000), *range(0xFB00, 0xFB07)] if drawn(chr(cp)) != missing}
    assert draws and draws <= font.codepoints
    assert {cp for cp in font.codepoints if unicodedata.category(chr(cp))[0] in "LN"} <= draws


# ------------------------------------------------------------------------------------------ icons

def draw_icon(path: Path, kind: int, colour: tuple[int, int, int]) -> None:
    img = Image.new("RGBA", (48, 48), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    [d.ellipse, d.rectangle, d.polygon][kind % 3](
        [(4, 4), (44, 44)] if kind % 3 < 2 else [(24, 2), (46, 46), (2, 46)], fill=(*colour, 255))
    d.line((4, 8 + 6 * kind, 44, 8 + 6 * kind), fill=(255, 255, 255, 255), width=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def test_icon_themes_aliases_variants_and_duplicates(tmp_path):
    theme = tmp_path / "Theme"
    apps, status = theme / "48x48" / "apps", theme / "48x48" / "status"
    draw_icon(apps / "alpha.png", 0, (200, 30, 30))
    draw_icon(apps / "gamma.png", 0, (200, 30, 30))  # same picture as alpha under another name
    draw_icon(apps / "beta.png", 1, (30, 160, 30))
    (apps / "beta-alias.png").symlink_to("beta.png")  # an alias: the same drawing, not a new class
    (apps / "dangling.png").symlink_to("nowhere.png")
    for i, name in enumerate(["x", "x-red", "y", "y-red"]):  # '-red' marks a variant of x and of y
        draw_icon(status / f"{name}.png", 2 + i, (40 + 50 * i, 40, 200))
    draw_icon(theme / "16x16" / "apps" / "alpha.png", 1, (0, 0, 0))  # smaller size: not chosen
    cands, notes = icon_candidates([theme, tmp_path / "absent"], 48, styles_per_class=8, min_variant_count=2)
    assert notes["themes"] == 1
    by_id = {c.identity: c for c in cands}
    assert sorted(by_id) == ["icon:alpha", "icon:beta", "icon:gamma", "icon:x", "icon:y"]
    assert by_id["icon:alpha"].group == "icon-context:apps" and by_id["icon:x"].group == "icon-context:status"
    assert len(by_id["icon:x"].load()) == 2 and len(by_id["icon:beta"].load()) == 1
    alpha = by_id["icon:alpha"].load()[0]
    assert alpha.style == "icon-theme:Theme" and not alpha.recolour  # red disc with a white bar: two colours
    assert alpha.image.getpixel((alpha.image.width // 2, alpha.image.height - 6))[:3] == (200, 30, 30)
    chosen, dropped = select({"icons": cands}, CorpusConfig(out="unused", max_classes=10))
    assert len(chosen) == 4 and dropped == {"icons": 1}  # alpha or gamma, not both


# ------------------------------------------------------------------------------------------ emoji

NOTO_EMOJI = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")


@pytest.mark.skipif(not NOTO_EMOJI.is_file(), reason="fonts-noto-color-emoji is not installed")
def test_emoji_source_draws_colour_emoji_and_real_flags_only():
    cands, notes = emoji_candidates(NOTO_EMOJI, font_codepoints(NOTO_EMOJI.read_bytes()), 48)
    by_id = {c.identity: c for c in cands}
    assert "emoji:grinning face" in by_id and "emoji:digit one" not in by_id
    if notes["flags"]:
        assert "emoji:flag FR" in by_id and "emoji:flag JP" in by_id
        assert "emoji:flag ZZ" not in by_id and "emoji:flag FZ" not in by_id
    shape = by_id["emoji:grinning face"].load()[0]
    rgb = np.asarray(shape.image.convert("RGB"), dtype=np.float32)[np.asarray(shape.image)[..., 3] > 200]
    assert not shape.recolour and (rgb.max(axis=1) - rgb.min(axis=1)).mean() > 60  # saturated colour, not grey


# ---------------------------------------------------------------------------------- corpus builds

def tiny(out: Path, fonts: list[str], **kw) -> CorpusConfig:
    base = dict(out=str(out), sources=["glyphs"], font_dirs=fonts, max_classes=12, views_per_class=4,
                val_views_per_class=2, size=32, shard_size=10)
    return CorpusConfig(**{**base, **kw})


def samples(root: Path) -> list[tuple[str, bytes, list[int]]]:
    index = read_index(root)
    return [s for p in index.paths() for s in iter_shard(p, dict(index.shards)[p.name])]


def test_tiny_corpus_from_pillows_font(tmp_path):
    empty = tmp_path / "no-fonts"
    empty.mkdir()
    cfg = tiny(tmp_path / "out" / "corpus", [str(empty)])  # no font files: Pillow's own font is used
    stats = build_corpus(cfg)
    out = Path(cfg.out)
    assert sorted(p.name for p in out.iterdir()) == ["classes.txt", "config.json", "stats.json", "train", "val"]
    assert [p.name for p in out.parent.iterdir()] == ["corpus"]  # no temporary folder left beside it
    assert CorpusConfig(**json.loads((out / "config.json").read_text())) == cfg
    assert stats["classes"] == 12 and stats["found"]["glyphs"]["builtin_font"] is True
    train, val = read_index(out / "train"), read_index(out / "val")
    assert train.classes == val.classes == (out / "classes.txt").read_text().splitlines()
    assert train.multi_label and train.num_samples == 12 * 4 and val.num_samples == 12 * 2
    k = train.info["identity_classes"]
    assert k == 12 and all(c.startswith("glyph:U+") for c in train.classes[:k])
    assert not any(c.startswith("glyph:") for c in train.classes[k:])
    views: Counter = Counter()
    pictures: set[bytes] = set()
    for split, root in (("train", out / "train"), ("val", out / "val")):
        for _key, data, labels in samples(root):
            names = [train.classes[i] for i in labels]
            identity = [n for n in names if n.startswith("glyph:")]
            assert len(identity) == 1 and len(labels) >= 3  # identity + script + font: multi-label
            ch = chr(int(identity[0].split()[0][len("glyph:U+"):], 16))
            assert ch.isascii() and ch.isalnum()  # ASCII letters and digits are tried first
            script = "script:digit" if ch.isdigit() else "script:latin"
            assert script in names and "font:Aileron" in names
            img = Image.open(io.BytesIO(data))
            assert img.format == "JPEG" and img.size == (32, 32) and img.mode == "RGB"
            views[(split, identity[0])] += 1
            pictures.add(data)
    assert set(views.values()) == {4, 2} and len(views) == 24
    assert len(pictures) == 12 * 6  # every view, train and held-out, is a different picture
    # The streaming dataset reads it: multi-hot targets over all labels.
    x, target = next(iter(ShardDataset(out / "train", lambda img, g: corpus_tensor(img))))
    assert x.shape == (3, 32, 32) and target.shape == (len(train.classes),) and target.sum() >= 3


def corpus_tensor(img):
    from bigtransfer.data.images import to_tensor

    return to_tensor(img)


def test_the_same_seed_gives_the_same_corpus_serial_or_parallel(tmp_path):
    empty = tmp_path / "no-fonts"
    empty.mkdir()
    build_corpus(tiny(tmp_path / "a", [str(empty)], max_classes=6, val_views_per_class=0))
    build_corpus(tiny(tmp_path / "b", [str(empty)], max_classes=6, val_views_per_class=0, workers=2))
    build_corpus(tiny(tmp_path / "c", [str(empty)], max_classes=6, val_views_per_class=0, seed=1))
    shards = sorted(p.name for p in (tmp_path / "a" / "train").iterdir())
    assert not (tmp_path / "a" / "val").exists()
    for name in shards:
        assert (tmp_path / "a" / "train" / name).read_bytes() == (tmp_path / "b" / "train" / name).read_bytes()
    assert samples(tmp_path / "a" / "train") != samples(tmp_path / "c" / "train")


def test_corpus_from_system_fonts_has_several_font_labels(tmp_path):
    files = [p for p in find_fonts(["/usr/share/fonts"]) if p.suffix == ".ttf"][:40]
    usable = []
    for p in files:
        try:
            ImageFont.truetype(str(p), 16)
            usable.append(str(p))
        except OSError:
            continue
    if len(usable) < 2:
        pytest.skip("fewer than two scalable fonts under /usr/share/fonts")
    cfg = tiny(tmp_path / "sys", usable[:6], max_classes=20, views_per_class=3, val_views_per_class=0,
               styles_per_class=4)
    build_corpus(cfg)
    index = read_index(tmp_path / "sys" / "train")
    fonts_used = Counter(index.classes[i] for _, _, labels in samples(tmp_path / "sys" / "train")
                         for i in labels if index.classes[i].startswith("font:"))
    assert len(fonts_used) >= 2 and sum(fonts_used.values()) == 20 * 3  # one font label per view


def test_failed_rebuild_keeps_the_old_corpus_and_refuses_to_clobber(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "no-fonts"
    empty.mkdir()
    out = tmp_path / "corpus"
    rc = main(["corpus", "--out", str(out), "--sources", "glyphs", "--fonts", str(empty), "--max-classes", "5",
               "--views-per-class", "3", "--size", "32"])
    assert rc == 0 and '"classes": 5' in capsys.readouterr().out
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rc = main(["corpus", "--out", str(out), "--sources", "glyphs", "--fonts", str(empty)])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 4:
            raise RuntimeError("renderer crashed")
        return corpus_render_view(*args, **kwargs)

    corpus_render_view = corpus.render_view
    monkeypatch.setattr(corpus, "render_view", failing)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        build_corpus(tiny(out, [str(empty)], max_classes=5, views_per_class=3, seed=9), overwrite=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "no-fonts"]
    with pytest.raises(CorpusError, match="unknown source"):
        build_corpus(tiny(tmp_path / "x", [str(empty)], sources=["pictures"]))
    assert main(["corpus", "--out", str(tmp_path / "x"), "--sources", "glyphs,pictures"]) == 2
    assert "unknown source(s) ['pictures']" in capsys.readouterr().err


def test_interrupting_a_build_leaves_no_output(tmp_path):
    empty = tmp_path / "no-fonts"
    empty.mkdir()
    out = tmp_path / "corpus"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "bigtransfer", "corpus", "--out", str(out), "--sources", "glyphs",
                             "--fonts", str(empty), "--max-classes", "10", "--views-per-class", "5000", "--size", "32",
                             "--shard-size", "50"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            # A suite started in the background by a script inherits SIGINT ignored, and Python then
                            # keeps ignoring it: give the build the default, as a terminal would.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 60
        # Wait until shards are being finished inside the hidden temporary folder: the build is under way.
        while time.time() < deadline and not list(tmp_path.glob(".corpus.*.partial/train/train-*.tar")):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        assert list(tmp_path.glob(".corpus.*.partial/train/train-*.tar")), "build never got going"
        assert not out.exists()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and b"interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-fonts"]  # neither the corpus nor a partial one
