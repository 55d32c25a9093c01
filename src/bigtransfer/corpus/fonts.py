"""Font files for the corpus: find them, and read which characters each one draws (its cmap table)."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from pathlib import Path

from PIL import ImageFont

from ..core.errors import UserError

FONT_SUFFIXES = (".ttf", ".otf", ".ttc")


class FontError(UserError):
    """A font file whose character map cannot be read; the message names the file."""


def _u16(data: bytes, at: int) -> int:
    return struct.unpack_from(">H", data, at)[0]


def _u32(data: bytes, at: int) -> int:
    return struct.unpack_from(">I", data, at)[0]


def _cmap_format4(data: bytes, at: int) -> set[int]:
    """Characters with a real glyph in a format-4 (BMP) subtable."""
    seg = _u16(data, at + 6) // 2
    ends, starts = at + 14, at + 16 + 2 * seg
    deltas, range_offsets = starts + 2 * seg, starts + 4 * seg
    codes: set[int] = set()
    for i in range(seg):
        start, end = _u16(data, starts + 2 * i), _u16(data, ends + 2 * i)
        delta, ro_at = struct.unpack_from(">h", data, deltas + 2 * i)[0], range_offsets + 2 * i
        ro = _u16(data, ro_at)
        for c in range(start, min(end, 0xFFFE) + 1):
            if ro == 0:
                glyph = (c + delta) & 0xFFFF
            else:
                g_at = ro_at + ro + 2 * (c - start)
                glyph = _u16(data, g_at) if g_at + 2 <= len(data) else 0
                glyph = (glyph + delta) & 0xFFFF if glyph else 0
            if glyph:
                codes.add(c)
    return codes


def _cmap_format12(data: bytes, at: int) -> set[int]:
    """Characters mapped by a format-12 (full Unicode) subtable."""
    codes: set[int] = set()
    for i in range(_u32(data, at + 12)):
        start, end, glyph = struct.unpack_from(">III", data, at + 16 + 12 * i)
        codes.update(range(start + (glyph == 0), min(end, 0x10FFFF) + 1))
    return codes


def font_codepoints(data: bytes, face: int = 0, name: str = "<font>") -> set[int]:
    """The Unicode code points a TrueType/OpenType font (or one face of a collection) has glyphs for."""
    try:
        base = _u32(data, 12 + 4 * face) if data[:4] == b"ttcf" else 0
        tables = {data[base + 12 + 16 * i: base + 16 + 16 * i]: _u32(data, base + 20 + 16 * i)
                  for i in range(_u16(data, base + 4))}
        if b"cmap" not in tables:
            raise FontError(f"{name}: no cmap table")
        cmap = tables[b"cmap"]
        subtables = {}
        for i in range(_u16(data, cmap + 2)):
            platform, encoding, offset = struct.unpack_from(">HHI", data, cmap + 4 + 8 * i)
            subtables[(platform, encoding, _u16(data, cmap + offset))] = cmap + offset
        # Full-Unicode tables first; Windows symbol (3, 0) maps private-use codes and is never chosen.
        for key in ((3, 10, 12), (0, 6, 12), (0, 4, 12), (0, 3, 12)):
            if key in subtables:
                return _cmap_format12(data, subtables[key])
        for key in ((3, 1, 4), (0, 3, 4), (0, 4, 4), (0, 1, 4), (0, 0, 4)):
            if key in subtables:
                return _cmap_format4(data, subtables[key])
        raise FontError(f"{name}: no Unicode character map (subtables {sorted(subtables)})")
    except (struct.error, IndexError) as e:
        raise FontError(f"{name}: truncated or corrupt font ({e})") from None


@dataclass
class Font:
    """One font face: where it comes from, its family and style, and the characters it draws."""

    source: str | bytes  # a file path, or the font's bytes for Pillow's built-in font
    family: str
    style: str
    codepoints: set[int] = field(repr=False)

    def load(self, size: int) -> ImageFont.FreeTypeFont:
        """The face at a pixel size."""
        src = io.BytesIO(self.source) if isinstance(self.source, bytes) else self.source
        return ImageFont.truetype(src, size)


def open_font(path: str | Path) -> Font:
    """Read a font file's names and character coverage (first face of a collection)."""
    path = Path(path)
    try:
        data = path.read_bytes()
        family, style = ImageFont.truetype(str(path), 16).getname()
    except OSError as e:
        raise FontError(f"{path}: cannot open font ({e})") from None
    return Font(str(path), family or path.stem, style or "", font_codepoints(data, name=str(path)))


def builtin_font() -> Font:
    """Pillow's own scalable font (present wherever Pillow >= 10.1 is built with FreeType)."""
    face = ImageFont.load_default(size=16)
    data = getattr(face, "font_bytes", None)
    if not isinstance(face, ImageFont.FreeTypeFont) or not data:
        raise FontError("Pillow's built-in font is not a scalable FreeType font here (needs Pillow >= 10.1)")
    family, style = face.getname()
    return Font(bytes(data), family or "Pillow default", style or "", font_codepoints(bytes(data), name="<pillow>"))


def find_fonts(roots: list[str | Path]) -> list[Path]:
    """Font files under the given folders, sorted."""
    found: set[Path] = set()
    for root in map(Path, roots):
        if root.is_file() and root.suffix.lower() in FONT_SUFFIXES:
            found.add(root)
        elif root.is_dir():
            found.update(p for p in root.rglob("*") if p.suffix.lower() in FONT_SUFFIXES and p.is_file())
    return sorted(found)
