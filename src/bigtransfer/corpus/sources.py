"""Where the corpus's classes come from: icon themes, a colour emoji font, and the characters of text fonts.

Each source lists candidate classes cheaply; a candidate's shapes are only drawn (load()) when it is chosen.
"""

from __future__ import annotations

import io
import random
import re
import shutil
import string
import subprocess
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, features

from ..data.shards import derive_seed
from .fonts import Font
from .render import Shape, as_mask, crop_to_ink, is_monochrome

ICON_SUFFIXES = (".png", ".svg")
# Icon contexts that are animation frames or cursors rather than distinct pictures.
_SKIP_CONTEXTS = {"animations", "cursors"}
_WORD_RE = re.compile(r"[a-z]{3,}")
# Words that join a name together rather than say what it shows; never labels.
_STOP_WORDS = frozenset({"and", "the", "with", "for", "from", "without", "sign", "symbol", "org", "com", "net"})


@dataclass
class Candidate:
    """A possible class: its identity label, source, group label, name words (for tags) and a shape loader."""

    identity: str
    source: str
    group: str
    words: list[str]
    load: Callable[[], list[Shape]]
    max_rotation: float = 20.0
    slow: bool = False  # loading runs an external program, so it is worth doing in parallel threads
    core: bool = False  # tried before the rest of its source


def name_words(text: str) -> list[str]:
    """Lower-case words of 3+ letters in a name, in order, without repeats."""
    words = _WORD_RE.findall(text.lower().replace("_", " "))
    return list(dict.fromkeys(w for w in words if w not in _STOP_WORDS))


def _fit(img: Image.Image, px: int) -> Image.Image:
    """Shrink so the longer side is at most px."""
    if max(img.size) <= px:
        return img
    k = px / max(img.size)
    return img.resize((max(1, round(img.width * k)), max(1, round(img.height * k))), Image.LANCZOS)


def _shape(img: Image.Image | None, px: int, style: str | None, allow_recolour: bool = True) -> Shape | None:
    """A cut-out from a rendered picture; monochrome pictures become recolourable masks."""
    cut = crop_to_ink(img) if img is not None else None
    if cut is None or max(cut.size) < 4:
        return None
    cut = _fit(cut, px)
    if allow_recolour and is_monochrome(cut):
        return Shape(as_mask(cut), recolour=True, style=style)
    return Shape(cut, recolour=False, style=style)


# ---------------------------------------------------------------------------------------------- icons

def svg_renderer() -> str | None:
    """The rsvg-convert program (Debian package librsvg2-bin) if installed; needed for SVG-only themes."""
    return shutil.which("rsvg-convert")


def _read_icon(path: Path, px: int) -> Image.Image | None:
    """An icon file as RGBA at about px pixels, or None when it cannot be read."""
    try:
        if path.suffix == ".svg":
            tool = svg_renderer()
            if tool is None:
                return None
            done = subprocess.run([tool, "-w", str(px), "-h", str(px), "-a", str(path)], capture_output=True,
                                  timeout=60, check=False)
            if done.returncode != 0 or not done.stdout:
                return None
            return Image.open(io.BytesIO(done.stdout)).convert("RGBA")
        with Image.open(path) as img:
            return img.convert("RGBA")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def _size_of(folder: str) -> int | None:
    """Design size of an icon-theme size folder: '48x48' -> 48, 'scalable'/'symbolic' -> large; else None."""
    if folder in ("scalable", "symbolic"):
        return 10_000
    m = re.fullmatch(r"(\d+)x(\d+)", folder)
    return int(m.group(1)) if m else None


def variant_tokens(names: set[str], min_count: int) -> set[str]:
    """Name parts that mark a variant of another icon ('-symbolic', '-blue', '-rtl'): dropping them gives an
    existing name for at least min_count icons."""
    counts: dict[str, int] = {}
    for name in names:
        parts = name.split("-")
        for i, part in enumerate(parts):
            if len(parts) > 1 and "-".join(parts[:i] + parts[i + 1:]) in names:
                counts[part] = counts.get(part, 0) + 1
    return {t for t, n in counts.items() if n >= min_count}


def base_name(name: str, names: set[str], variants: set[str]) -> str:
    """The icon a variant belongs to: drop variant parts while the shorter name still exists."""
    parts = name.split("-")
    i = 0
    while i < len(parts):
        shorter = parts[:i] + parts[i + 1:]
        if parts[i] in variants and shorter and "-".join(shorter) in names:
            parts = shorter
        else:
            i += 1
    return "-".join(parts)


def icon_candidates(themes: list[str | Path], px: int, styles_per_class: int, seed: int = 0,
                    min_variant_count: int = 70) -> tuple[list[Candidate], dict[str, int]]:
    """One candidate per icon, its drawings in every theme and variant (colour, symbolic, ...) as styles."""
    can_svg = svg_renderer() is not None
    drawings: dict[str, list[tuple[str, str, Path]]] = {}  # icon name -> [(theme, context, file)]
    notes = {"themes": 0, "svg_skipped": 0}
    names: set[str] = set()  # every icon name, aliases included
    for theme_dir in map(Path, themes):
        if not theme_dir.is_dir():
            continue
        notes["themes"] += 1
        best: dict[str, tuple[tuple, str, Path]] = {}  # name -> (preference, context, file)
        for size_dir in sorted(theme_dir.iterdir()):
            size = _size_of(size_dir.name)
            if size is None or not size_dir.is_dir():
                continue
            for ctx_dir in sorted(size_dir.iterdir()):
                if not ctx_dir.is_dir() or ctx_dir.is_symlink() or ctx_dir.name in _SKIP_CONTEXTS:
                    continue
                for f in ctx_dir.iterdir():
                    if f.suffix not in ICON_SUFFIXES or not f.exists():
                        continue
                    if f.suffix == ".svg" and not can_svg:
                        notes["svg_skipped"] += 1
                        continue
                    name = f.name[: -len(f.suffix)].removesuffix(".symbolic")
                    # A bitmap at least as large as needed, else a vector drawing, else the largest bitmap.
                    pref = (f.suffix == ".png" and size >= px, f.suffix == ".svg", size)
                    if name not in best or pref > best[name][0]:
                        best[name] = (pref, ctx_dir.name, f)
        names.update(best)
        # Aliases (symlinks to one drawing) collapse onto their shortest name.
        by_file: dict[Path, str] = {}
        for name, (_, _, f) in best.items():
            real = f.resolve()
            if real not in by_file or (len(name), name) < (len(by_file[real]), by_file[real]):
                by_file[real] = name
        for real, name in by_file.items():
            drawings.setdefault(name, []).append((theme_dir.name, best[name][1], real))
    variants = variant_tokens(names, min_variant_count)
    classes: dict[str, list[tuple[str, str, Path]]] = {}
    for name in sorted(drawings):
        classes.setdefault(base_name(name, names, variants), []).extend(drawings[name])
    notes["variant_tokens"] = len(variants)

    def loader(name: str, entries: list[tuple[str, str, Path]]) -> Callable[[], list[Shape]]:
        def load() -> list[Shape]:
            chosen = list(entries)
            random.Random(derive_seed("icon-styles", seed, name)).shuffle(chosen)
            shapes = [_shape(_read_icon(f, px), px, f"icon-theme:{theme}") for theme, _, f in chosen[:styles_per_class]]
            return [s for s in shapes if s is not None]
        return load

    out = []
    for name, entries in sorted(classes.items()):
        own = next((e for e in entries if e[2].stem.removesuffix(".symbolic") == name), entries[0])
        out.append(Candidate(f"icon:{name}", "icons", f"icon-context:{own[1]}", name_words(name), loader(name, entries),
                             max_rotation=20.0, slow=any(f.suffix == ".svg" for _, _, f in entries)))
    return out, notes


# ---------------------------------------------------------------------------------------------- emoji

EMOJI_STRIKE = 109  # the one pixel size a CBDT colour emoji font (Noto Color Emoji) can be opened at
# Unicode blocks that hold emoji (from the Unicode Character Database's Blocks.txt), as group labels.
_EMOJI_BLOCKS = [(0x2000, 0x2BFF, "symbols"), (0x3000, 0x33FF, "cjk-symbols"), (0x1F000, 0x1F2FF, "enclosed"),
                 (0x1F300, 0x1F5FF, "pictographs"), (0x1F600, 0x1F64F, "emoticons"), (0x1F680, 0x1F6FF, "transport"),
                 (0x1F780, 0x1F7FF, "geometric"), (0x1F900, 0x1F9FF, "supplemental"),
                 (0x1FA70, 0x1FAFF, "pictographs-extended")]
_REGIONAL_A = 0x1F1E6


def _emoji_image(face: ImageFont.FreeTypeFont, text: str) -> Image.Image:
    canvas = Image.new("RGBA", (EMOJI_STRIKE * 3, EMOJI_STRIKE * 2), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((8, 8), text, font=face, embedded_color=True)
    return canvas


def emoji_candidates(font_path: str | Path, codepoints: set[int], px: int) -> tuple[list[Candidate], dict[str, int]]:
    """One candidate per single-character emoji, plus one per country flag the font draws."""
    face = ImageFont.truetype(str(font_path), EMOJI_STRIKE)
    items: list[tuple[str, str, str, list[str]]] = []  # (text, identity, group, words)
    for cp in sorted(codepoints):
        ch = chr(cp)
        name = unicodedata.name(ch, "")
        cat = unicodedata.category(ch)
        # Keep pictures: symbols and a few punctuation emoji; not digits, skin-tone modifiers or flag letters.
        if not name or cat[0] not in "SP" or cat == "Sk" or _REGIONAL_A <= cp < _REGIONAL_A + 26 or cp < 0xA9:
            continue
        block = next((b for lo, hi, b in _EMOJI_BLOCKS if lo <= cp <= hi), "other")
        items.append((ch, f"emoji:{name.lower()}", f"emoji-block:{block}", name_words(name)))
    notes = {"flags": 0}
    if features.check("raqm"):
        # Letter pairs that the font joins into a flag; unknown pairs all draw the same 'unknown flag'.
        face_raqm = ImageFont.truetype(str(font_path), EMOJI_STRIKE, layout_engine=ImageFont.Layout.RAQM)
        unknown = _emoji_image(face_raqm, chr(_REGIONAL_A + 25) * 2).tobytes()
        single = face_raqm.getlength(chr(_REGIONAL_A))
        for i in range(26):
            for j in range(26):
                pair = chr(_REGIONAL_A + i) + chr(_REGIONAL_A + j)
                if face_raqm.getlength(pair) > 1.5 * single or _emoji_image(face_raqm, pair).tobytes() == unknown:
                    continue
                code = chr(65 + i) + chr(65 + j)
                items.append((pair, f"emoji:flag {code}", "emoji-block:flags", ["flag"]))
                notes["flags"] += 1
        face = face_raqm

    def loader(text: str) -> Callable[[], list[Shape]]:
        def load() -> list[Shape]:
            shape = _shape(_emoji_image(face, text), px, None, allow_recolour=False)
            return [shape] if shape else []
        return load

    return [Candidate(ident, "emoji", group, words, loader(text), max_rotation=20.0)
            for text, ident, group, words in items], notes


# ---------------------------------------------------------------------------------------------- glyphs

_GLYPH_CATEGORIES = {"Lu", "Ll", "Lt", "Lo", "Nd", "Nl", "No", "Sm", "Sc", "So"}
_SYMBOL_KINDS = {"Sm": "math", "Sc": "currency", "So": "symbol"}
# ASCII letters and digits are tried first: the shapes later tasks are most likely to meet.
_CORE_GLYPHS = frozenset(string.ascii_letters + string.digits)


def glyph_group(cp: int) -> str:
    """A character's group label: its script (the first word of its name) or, for symbols, its kind."""
    ch = chr(cp)
    cat = unicodedata.category(ch)
    if cat in _SYMBOL_KINDS:
        return f"glyph-kind:{_SYMBOL_KINDS[cat]}"
    return f"script:{unicodedata.name(ch).split()[0].lower()}"


def _glyph_image(face: ImageFont.FreeTypeFont, ch: str, px: int) -> Image.Image:
    canvas = Image.new("RGBA", (px * 3, px * 3), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((px * 1.5, px * 1.5), ch, font=face, fill=(255, 255, 255, 255), anchor="mm")
    return canvas


def glyph_candidates(fonts: list[Font], px: int, styles_per_class: int, seed: int = 0) -> list[Candidate]:
    """One candidate per letter, digit or symbol that some font draws; its shapes come from several fonts."""
    covering: dict[int, list[Font]] = {}
    for font in fonts:
        for cp in font.codepoints:
            if unicodedata.category(chr(cp)) in _GLYPH_CATEGORIES and unicodedata.name(chr(cp), ""):
                covering.setdefault(cp, []).append(font)
    faces: dict[int, ImageFont.FreeTypeFont] = {}

    def face_of(font: Font) -> ImageFont.FreeTypeFont:
        if id(font) not in faces:
            faces[id(font)] = font.load(px)
        return faces[id(font)]

    def loader(cp: int, options: list[Font]) -> Callable[[], list[Shape]]:
        def load() -> list[Shape]:
            # One style of every family before a second style of any; families in a seeded order.
            families: dict[str, list[Font]] = {}
            for f in sorted(options, key=lambda f: (f.family, f.style not in ("Regular", "Book"), f.style)):
                families.setdefault(f.family, []).append(f)
            names = sorted(families)
            random.Random(derive_seed("glyph-fonts", seed, cp)).shuffle(names)
            order = [families[n][r] for r in range(max(map(len, families.values()))) for n in names
                     if r < len(families[n])]
            shapes = []
            for font in order:
                try:
                    img = _glyph_image(face_of(font), chr(cp), px)
                except OSError:
                    continue
                shape = _shape(img, px, f"font:{font.family}")
                # Marks and dots that fill a small corner of the em square are not worth a class.
                if shape is not None and max(shape.image.size) >= px // 4:
                    shapes.append(shape)
                if len(shapes) >= styles_per_class:
                    break
            return shapes
        return load

    return [Candidate(f"glyph:U+{cp:04X} {unicodedata.name(chr(cp)).lower()}", "glyphs", glyph_group(cp),
                      name_words(unicodedata.name(chr(cp))), loader(cp, covering[cp]), max_rotation=12.0,
                      core=chr(cp) in _CORE_GLYPHS)
            for cp in sorted(covering)]
