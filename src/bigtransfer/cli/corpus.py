"""`bigtransfer corpus --out DIR`: build the BiT-Mini upstream corpus (icons, emoji, glyphs) as tar shards."""

from __future__ import annotations

import argparse
import json

HELP = "Build a multi-label upstream corpus from installed icon themes, emoji and fonts, as tar shards."

_EPILOG = """\
The full corpus draws on Debian packages (as root):
  {apt}
Without them only 'glyphs' works, from Pillow's built-in font.
Output: DIR/train/ and DIR/val/ (shards + index.json), DIR/config.json, DIR/stats.json, DIR/classes.txt.
DIR appears only once the build has finished."""


def register(p: argparse.ArgumentParser) -> None:
    """Add this verb's options."""
    from ..corpus.build import APT_COMMAND, SOURCES, CorpusConfig

    d = CorpusConfig(out="")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _EPILOG.format(apt=APT_COMMAND)
    p.add_argument("--out", required=True, help="folder to create (must not exist, unless --overwrite)")
    p.add_argument("--sources", default=",".join(d.sources),
                   help=f"comma-separated, from {','.join(SOURCES)} (default: all)")
    p.add_argument("--max-classes", type=int, default=d.max_classes,
                   help=f"classes in all, shared evenly by the sources (default {d.max_classes})")
    p.add_argument("--views-per-class", type=int, default=d.views_per_class,
                   help=f"training images per class (default {d.views_per_class})")
    p.add_argument("--val-views-per-class", type=int, default=d.val_views_per_class,
                   help=f"held-out images per class, other random views (default {d.val_views_per_class})")
    p.add_argument("--size", type=int, default=d.size, help=f"image side in pixels (default {d.size})")
    p.add_argument("--shard-size", type=int, default=d.shard_size, help=f"images per shard (default {d.shard_size})")
    p.add_argument("--seed", type=int, default=d.seed, help="the same seed and packages give the same corpus")
    p.add_argument("--format", dest="image_format", choices=["jpg", "png"], default=d.image_format,
                   help=f"image encoding (default {d.image_format})")
    p.add_argument("--styles-per-class", type=int, default=d.styles_per_class,
                   help=f"fonts per glyph, themes/variants per icon (default {d.styles_per_class})")
    p.add_argument("--icon-theme", dest="icon_themes", action="append", metavar="DIR",
                   help="icon theme folder (repeatable; default: " + ", ".join(d.icon_themes) + ")")
    p.add_argument("--fonts", dest="font_dirs", action="append", metavar="PATH",
                   help=f"font folder or file (repeatable; default {', '.join(d.font_dirs)})")
    p.add_argument("--emoji-font", default=d.emoji_font, help="colour emoji font (default: Noto Color Emoji)")
    p.add_argument("--workers", type=int, default=d.workers, help="processes for rendering (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists (only once the new one is done)")


def run(args: argparse.Namespace) -> int:
    """Build the corpus and print its statistics."""
    from ..corpus.build import CorpusConfig, build_corpus

    d = CorpusConfig(out="")
    cfg = CorpusConfig(
        out=args.out, sources=[s.strip() for s in args.sources.split(",") if s.strip()],
        max_classes=args.max_classes, views_per_class=args.views_per_class,
        val_views_per_class=args.val_views_per_class, size=args.size, shard_size=args.shard_size, seed=args.seed,
        image_format=args.image_format, styles_per_class=args.styles_per_class,
        icon_themes=args.icon_themes or d.icon_themes, font_dirs=args.font_dirs or d.font_dirs,
        emoji_font=args.emoji_font, workers=args.workers,
    )
    stats = build_corpus(cfg, overwrite=args.overwrite)
    print(json.dumps({k: stats[k] for k in ("classes", "classes_per_source", "labels", "label_kinds", "splits",
                                             "bytes", "seconds")}, indent=1))
    return 0
