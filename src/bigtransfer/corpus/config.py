"""The settings of a corpus build, each declared once (default + help, `core.settings`), and what it draws on.

Free of numpy and torch on purpose: `bigtransfer corpus` builds its options from these fields without loading them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import UserError
from ..core.settings import setting

SOURCES = ("icons", "emoji", "glyphs")
# Debian packages the full corpus is drawn from (see docs/corpus.md); none is needed for a glyphs-only corpus.
APT_PACKAGES = ("papirus-icon-theme", "adwaita-icon-theme", "librsvg2-bin", "fonts-noto-color-emoji",
                "fonts-noto-core", "fonts-dejavu", "fonts-liberation", "fonts-freefont-ttf")
APT_COMMAND = "apt-get update && apt-get install -y " + " ".join(APT_PACKAGES)


class CorpusError(UserError, RuntimeError):
    """A corpus that cannot be built as asked; the message says why and what to install or change."""


@dataclass
class CorpusConfig:
    """Everything that decides a corpus; saved as config.json inside it."""

    out: str = setting(help="folder to create (must not exist, unless --overwrite)")
    sources: list[str] = setting(help=f"comma-separated, from {','.join(SOURCES)} (default: all)",
                                 default_factory=lambda: list(SOURCES), kind="csv")
    max_classes: int = setting(4500, "classes in all, shared evenly by the sources (default %(default)s)")
    views_per_class: int = setting(80, "training images per class (default %(default)s)")
    val_views_per_class: int = setting(3, "held-out images per class, other random views (default %(default)s)")
    size: int = setting(64, "image side in pixels (default %(default)s)")
    shard_size: int = setting(2000, "images per shard (default %(default)s)")
    seed: int = setting(0, "the same seed and packages give the same corpus")
    image_format: str = setting("jpg", "image encoding (default %(default)s)", flag="--format", choices=("jpg", "png"))
    jpeg_quality: int = setting(90, "JPEG quality of the views", cli=False)
    styles_per_class: int = setting(8, "fonts per glyph, themes/variants per icon (default %(default)s)")
    icon_themes: list[str] = setting(
        help="icon theme folder (repeatable; default: /usr/share/icons/Papirus, /usr/share/icons/Adwaita)",
        default_factory=lambda: ["/usr/share/icons/Papirus", "/usr/share/icons/Adwaita"], flag="--icon-theme",
        metavar="DIR", kind="append")
    font_dirs: list[str] = setting(help="font folder or file (repeatable; default /usr/share/fonts)",
                                   default_factory=lambda: ["/usr/share/fonts"], flag="--fonts", metavar="PATH",
                                   kind="append")
    emoji_font: str = setting("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
                              "colour emoji font (default: Noto Color Emoji)")
    dedupe_threshold: float = setting(0.02, "mean absolute difference of 24x24 signatures below which shapes are the "
                                      "same", cli=False)
    min_tag_count: int = setting(5, "a name word becomes a label when this many classes share it ...", cli=False)
    max_tag_share: float = setting(0.05, "... and at most this share of all classes does", cli=False)
    workers: int = setting(1, "processes for rendering (default %(default)s)")

    def validate(self) -> None:
        """Raise CorpusError for settings that cannot work."""
        unknown = [s for s in self.sources if s not in SOURCES]
        if unknown or not self.sources:
            raise CorpusError(f"unknown source(s) {unknown or '(none)'}; choose from {', '.join(SOURCES)}")
        for name in ("max_classes", "views_per_class", "shard_size", "styles_per_class", "workers"):
            if getattr(self, name) < 1:
                raise CorpusError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.val_views_per_class < 0:
            raise CorpusError(f"val_views_per_class must be at least 0, got {self.val_views_per_class}")
        if not 16 <= self.size <= 512:
            raise CorpusError(f"size must be between 16 and 512 pixels, got {self.size}")
        if self.image_format not in ("jpg", "png"):
            raise CorpusError(f"image_format must be jpg or png, got {self.image_format!r}")

    @property
    def shape_px(self) -> int:
        """Resolution the shapes are drawn at before views shrink them (1.5x the view, for clean resampling)."""
        return max(48, round(self.size * 1.5))
