"""Append "plain" glyph views to a copy of a packed corpus: the A/B data of BiT-Mini's fourth and fifth sessions.

A plain view is one character of the corpus's glyph classes drawn frame-filling in grey ink on a flat ground: a font
file that covers it, stroke width varied (max/min filters), stretched, sheared, rotated up to 10 degrees, blurred and
noised, 64 px. It has no background, colour or clutter: the corpus's own glyph views do, which is what taught v2 the
pictures of its classes but not the bare shapes of characters that small grey images (the demo's digits) show.

Labels (`--labels`): "identity" gives a view only its character's class (`glyph:U+...`); "corpus" gives it every
label the corpus gives that character's views except the font's. With the corpus's labels, short runs learnt only
the frequent generic labels (script, case) from such views; with identity labels, the digits' features improved
(docs/models/BiT-Mini.md). The packed sets of the card were made with:

    python tools/add_glyph_views.py /root/bitmini/packed /root/bitmini/packed-plain-id --views 40 --ascii-extra 600
    python tools/add_glyph_views.py /root/bitmini/packed /root/bitmini/packed-ascii-id --views 0 --ascii-extra 600 \\
        --only-new

Fonts: every font file under --fonts (default /usr/share/fonts; the card's sets had Debian's fonts-dejavu,
-noto-core, -liberation and the handwriting-style fonts-dkg-handwriting, -rufscript, -comic-neue, -dancingscript,
-kaushanscript). The views are a function of the corpus, the font files and --seed: the same machine rebuilds the
same arrays. The result is written to a hidden partial folder and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import string
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from bigtransfer.corpus.fonts import Font, FontError, find_fonts, open_font
from bigtransfer.data.packed import PACKED_NAME, PackedError, PackedSet, open_packed

SIZE = 64
CORE = set(string.ascii_letters + string.digits)  # the characters --ascii-extra adds views of


def glyph_labels(packed: PackedSet, identity: bool) -> dict[int, list[int]]:
    """For each glyph class of `packed`: the labels its new views get (from its first view's row)."""
    glyphs = {i for i, c in enumerate(packed.classes) if c.startswith("glyph:U+")}
    labels: dict[int, list[int]] = {}
    for row in range(len(packed)):
        mine = packed.labels(row)
        for j in mine:
            if j in glyphs and j not in labels:
                labels[j] = [j] if identity else [k for k in mine if not packed.classes[k].startswith("font:")]
    return labels


def load_fonts(roots: list[str], family: str | None) -> list[Font]:
    """The readable font files under `roots`, optionally only the families matching the regular expression."""
    fonts = []
    for path in find_fonts(roots):
        try:
            fonts.append(open_font(path))
        except FontError:
            continue
    if family:
        fonts = [f for f in fonts if re.search(family, f.family, re.I)]
    if not fonts:
        raise SystemExit(f"no usable font file under {', '.join(roots)}" + (f" of family /{family}/" if family else ""))
    return fonts


class GlyphPainter:
    """Draws plain views of characters; the random draws happen in one fixed order, so a seed fixes the views."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.faces: dict[int, ImageFont.FreeTypeFont] = {}

    def _ink(self, ch: str, covering: list[Font]) -> Image.Image | None:
        """The character's ink at 80 px, cropped, from a random covering font (10 tries: some fonts draw nothing)."""
        for _ in range(10):
            font = covering[int(self.rng.integers(len(covering)))]
            face = self.faces.setdefault(id(font), font.load(80))
            canvas = Image.new("L", (240, 240), 0)
            try:
                ImageDraw.Draw(canvas).text((120, 120), ch, font=face, fill=255, anchor="mm")
            except OSError:
                continue
            box = canvas.getbbox()
            if box and max(box[2] - box[0], box[3] - box[1]) >= 20:
                return canvas.crop(box)
        return None

    def _shape(self, ink: Image.Image) -> Image.Image:
        """Stroke width, size (65-100% of the height), aspect, shear and rotation varied; fits in SIZE x SIZE."""
        rng = self.rng
        k = rng.random()
        if k < 0.35:
            ink = ink.filter(ImageFilter.MaxFilter(int(rng.choice([3, 5, 7]))))
        elif k < 0.5:
            ink = ink.filter(ImageFilter.MinFilter(3))
        w, h = ink.size
        height = rng.uniform(0.65, 1.0) * SIZE
        wide = w / h * height * np.exp(rng.uniform(-0.35, 0.35))
        width = min(SIZE, max(3, wide))
        if wide > SIZE:  # a wide glyph: fit its width instead
            height = height * SIZE / wide
        ink = ink.resize((max(1, round(width)), max(1, round(height))), Image.BICUBIC)
        shear = rng.uniform(-0.3, 0.3)
        ink = ink.transform(ink.size, Image.AFFINE, (1, shear, -shear * ink.size[1] / 2, 0, 1, 0), Image.BICUBIC)
        ink = ink.rotate(rng.uniform(-10, 10), Image.BICUBIC, expand=True)
        if max(ink.size) > SIZE:
            s = SIZE / max(ink.size)
            ink = ink.resize((max(1, int(ink.width * s)), max(1, int(ink.height * s))), Image.BICUBIC)
        return ink

    def view(self, ch: str, covering: list[Font]) -> np.ndarray | None:
        """One SIZE x SIZE x 3 uint8 view of `ch` (grey), or None when no covering font draws it."""
        rng = self.rng
        ink = self._ink(ch, covering)
        if ink is None:
            return None
        ink = self._shape(ink)
        mask = Image.new("L", (SIZE, SIZE), 0)
        mask.paste(ink, (int(rng.integers(0, SIZE - ink.width + 1)), int(rng.integers(0, SIZE - ink.height + 1))))
        dark = rng.random() < 0.5  # light ink on a dark ground, or the other way round
        ground = rng.uniform(0, 70) if dark else rng.uniform(185, 255)
        colour = rng.uniform(170, 255) if dark else rng.uniform(0, 85)
        grey = ground + (colour - ground) * (np.asarray(mask, np.float32) / 255)
        img = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), "L")
        radius = rng.uniform(0, 2.5)
        if radius > 0.3:
            img = img.filter(ImageFilter.GaussianBlur(radius))
        noisy = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(0, 8), (SIZE, SIZE))
        return np.repeat(np.clip(noisy, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def new_views(classes: list[str], labels: dict[int, list[int]], fonts: list[Font], views: int, ascii_extra: int,
              seed: int, limit: int | None = None) -> tuple[list[np.ndarray], list[list[int]]]:
    """`views` plain views of every glyph class (`ascii_extra` more for ASCII letters and digits), in class order."""
    painter = GlyphPainter(np.random.default_rng(seed))
    images: list[np.ndarray] = []
    targets: list[list[int]] = []
    for j in sorted(labels):
        codepoint = int(classes[j].split()[0][len("glyph:U+"):], 16)
        covering = [f for f in fonts if codepoint in f.codepoints]
        for _ in range(views + (ascii_extra if chr(codepoint) in CORE else 0) if covering else 0):
            if limit is not None and len(images) >= limit:
                return images, targets
            v = painter.view(chr(codepoint), covering)
            if v is not None:
                images.append(v)
                targets.append(labels[j])
    return images, targets


def write_packed(src: Path, dst: Path, images: list[np.ndarray], targets: list[list[int]], only_new: bool,
                 note: str, classes: list[str] | None = None) -> None:
    """DST: SRC's val/ (or test/) as it is, and its train/ followed by the new views (or the new views only).

    `classes`: the class list of DST when the views add classes (SRC's, then the new ones), written to every split.
    """
    if dst.exists():
        raise SystemExit(f"{dst}: already exists; choose another output folder or delete it")
    old = open_packed(src / "train")
    if classes is not None and classes[:len(old.classes)] != old.classes:
        raise ValueError("the new class list must start with the packed set's own classes")
    meta = json.loads((src / "train" / PACKED_NAME).read_text())
    keep = 0 if only_new else len(old)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    try:
        for split in ("val", "test"):
            if (src / split).is_dir():
                shutil.copytree(src / split, tmp / split)
                if classes is not None:
                    held = json.loads((tmp / split / PACKED_NAME).read_text())
                    (tmp / split / PACKED_NAME).write_text(json.dumps({**held, "classes": classes},
                                                                      ensure_ascii=False) + "\n")
        (tmp / "train").mkdir()
        out = np.lib.format.open_memmap(tmp / "train" / "images.npy", mode="w+", dtype=np.uint8,
                                        shape=(keep + len(images), SIZE, SIZE, 3))
        source = np.load(src / "train" / "images.npy", mmap_mode="r")
        for s in range(0, keep, 20000):
            out[s:min(keep, s + 20000)] = source[s:min(keep, s + 20000)]
        for i, view in enumerate(images):  # one by one: a stacked copy would double the memory held
            out[keep + i] = view
        out.flush()
        del out
        offsets = np.load(src / "train" / "label_offsets.npy")[:keep + 1]
        indices = np.load(src / "train" / "label_indices.npy")[:offsets[-1]]
        added = np.cumsum([len(t) for t in targets], dtype=np.int64)
        np.save(tmp / "train" / "label_offsets.npy", np.concatenate([offsets, offsets[-1] + added]).astype(np.int64))
        flat = np.asarray([k for t in targets for k in t], dtype=indices.dtype)
        np.save(tmp / "train" / "label_indices.npy", np.concatenate([indices, flat]))
        meta.update(num_samples=keep + len(images), source=f"{meta.get('source')} + {note}",
                    multi_label=bool(meta.get("multi_label")) or any(len(t) > 1 for t in targets))
        if classes is not None:
            meta["classes"] = classes
        (tmp / "train" / PACKED_NAME).write_text(json.dumps(meta, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o755)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def save_grid(images: list[np.ndarray], path: Path, columns: int = 12) -> None:
    """The views as one PNG, `columns` to a row (a short last row padded with black)."""
    blank = np.zeros_like(images[0])
    padded = images + [blank] * (-len(images) % columns)
    rows = [np.concatenate(padded[k:k + columns], 1) for k in range(0, len(padded), columns)]
    Image.fromarray(np.concatenate(rows, 0)).save(path)


def open_source(src: Path, dst: Path, preview: bool) -> PackedSet:
    """SRC's packed training set, refused unless DST is free (when writing) and its rows are SIZE x SIZE."""
    if dst.exists() and not preview:
        raise SystemExit(f"{dst}: already exists; choose another output folder or delete it")
    try:
        packed = open_packed(src / "train")
    except PackedError as e:
        raise SystemExit(str(e)) from None
    if packed.images.shape[1:] != (SIZE, SIZE, 3):
        raise SystemExit(f"{src / 'train'}: holds {packed.images.shape[1]}x{packed.images.shape[2]} images; the "
                         f"views are {SIZE}x{SIZE} (pack the corpus with 'bigtransfer pack --size {SIZE}')")
    return packed


def views_parser(doc: str | None, preview: str) -> argparse.ArgumentParser:
    """The arguments both tools take: SRC, DST, --only-new, --preview (which writes `preview` instead of DST)."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    p.add_argument("src", type=Path, help="a packed corpus folder (train/ and val/, from 'bigtransfer pack')")
    p.add_argument("dst", type=Path, help="the new packed corpus folder (must not exist)")
    p.add_argument("--only-new", action="store_true", help="leave SRC's training images out")
    p.add_argument("--preview", type=Path, help=f"write {preview} to this PNG and stop")
    return p


def main(argv: list[str] | None = None) -> int:
    p = views_parser(__doc__, "a grid of the first 48 views")
    p.add_argument("--views", type=int, default=40, help="views of each glyph class (default %(default)s)")
    p.add_argument("--ascii-extra", type=int, default=0, help="more views of each ASCII letter and digit")
    p.add_argument("--labels", choices=("identity", "corpus"), default="identity", help="see the module doc")
    p.add_argument("--fonts", nargs="+", default=["/usr/share/fonts"], help="font folders or files")
    p.add_argument("--family", help="only font families matching this regular expression")
    p.add_argument("--seed", type=int, default=4, help="seed of the views (default %(default)s, the card's)")
    args = p.parse_args(argv)
    packed = open_source(args.src, args.dst, args.preview is not None)
    labels = glyph_labels(packed, args.labels == "identity")
    classes = packed.classes
    fonts = load_fonts(args.fonts, args.family)
    images, targets = new_views(classes, labels, fonts, args.views, args.ascii_extra, args.seed,
                                limit=48 if args.preview else None)
    print(f"{len(labels)} glyph classes, {len(fonts)} font files: {len(images)} new views")
    if not images:
        raise SystemExit("no view drawn: no font covers the corpus's glyph classes")
    if args.preview:
        save_grid(images, args.preview)
        return 0
    note = (f"tools/add_glyph_views.py --views {args.views} --ascii-extra {args.ascii_extra} --labels {args.labels}"
            f" --seed {args.seed}" + (" --only-new" if args.only_new else ""))
    write_packed(args.src, args.dst, images, targets, args.only_new, note)
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
