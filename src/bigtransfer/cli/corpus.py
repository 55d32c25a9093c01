"""`bigtransfer corpus --out DIR`: build the BiT-Mini upstream corpus (icons, emoji, glyphs) as tar shards."""

from __future__ import annotations

import argparse
import json

from ..corpus.config import APT_COMMAND, CorpusConfig
from .options import add_options, config_from

HELP = "Build a multi-label upstream corpus from installed icon themes, emoji and fonts, as tar shards."

_EPILOG = """\
The full corpus draws on Debian packages (as root):
  {apt}
Without them only 'glyphs' works, from Pillow's built-in font.
Output: DIR/train/ and DIR/val/ (shards + index.json), DIR/config.json, DIR/stats.json, DIR/classes.txt.
DIR appears only once the build has finished."""


def register(p: argparse.ArgumentParser) -> None:
    """Add this verb's options: one per setting of CorpusConfig, and --overwrite."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _EPILOG.format(apt=APT_COMMAND)
    add_options(p, CorpusConfig, out={"metavar": "DIR"})
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists (only once the new one is done)")


def run(args: argparse.Namespace) -> int:
    """Build the corpus and print its statistics."""
    # Loads numpy, torch and the renderers: imported here, not when the command line is built (start-up time).
    from ..corpus.build import build_corpus

    stats = build_corpus(config_from(CorpusConfig, args), overwrite=args.overwrite)
    print(json.dumps({k: stats[k] for k in ("classes", "classes_per_source", "labels", "label_kinds", "splits",
                                             "bytes", "seconds")}, indent=1))
    return 0
