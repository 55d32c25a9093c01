"""Render the demo's second task: emoji that the bundled BiT-Mini never saw upstream, as a tar of real JPEG files.

The classes are emoji of Noto Color Emoji (SIL Open Font License) whose names are not among the shipped model's
labels (so not among its corpus's classes); every view is drawn by the corpus's own renderer (`render_view`:
backdrop, scale, position, aspect, rotation, shadow, blur, noise) at the corpus's size, with seeds of its own.
The tar holds emoji/train/<name>/NNN.jpg, emoji/test/<name>/NNN.jpg and emoji/SOURCE.json (how it was made).

    apt-get install -y fonts-noto-color-emoji
    python tools/make_demo_emoji.py src/bigtransfer/transfer/demo_emoji.tar
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np

from bigtransfer.core.atomic import atomic_path
from bigtransfer.corpus.config import CorpusConfig
from bigtransfer.corpus.fonts import font_codepoints
from bigtransfer.corpus.render import encode, render_view
from bigtransfer.corpus.sources import emoji_candidates
from bigtransfer.model.checkpoints import read_metadata
from bigtransfer.model.registry import resolve

SEED = 99  # the corpus's views use seed 0


def main() -> None:
    """Pick the unseen emoji, render their views, write the tar atomically."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train", type=int, default=16, help="training views per class (the demo's K at most)")
    p.add_argument("--test", type=int, default=30, help="test views per class")
    args = p.parse_args()
    cfg = CorpusConfig(out="-")
    font = Path(cfg.emoji_font)
    seen = set(json.loads(read_metadata(resolve("BiT-Mini-R26x0.5").path)["labels"]))
    cands, _ = emoji_candidates(font, font_codepoints(font.read_bytes(), name=str(font)), cfg.shape_px)
    unseen = [c for c in cands if c.identity not in seen and "flag" not in c.identity]  # flags: near-duplicates
    random.Random(SEED).shuffle(unseen)
    picked = [(c, shapes) for c, shapes in ((c, c.load()) for c in unseen) if shapes][:args.classes]
    with atomic_path(args.out) as tmp, tarfile.open(tmp, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))

        for k, (c, shapes) in enumerate(picked):
            folder = c.identity.split(":", 1)[1].replace(" ", "_")
            for split, n in (("train", args.train), ("test", args.test)):
                for v in range(n):
                    rng = np.random.default_rng([SEED, k, split == "test", v])
                    img = render_view(shapes[0], cfg.size, rng, c.max_rotation)
                    add(f"emoji/{split}/{folder}/{v:03d}.jpg", encode(img, "jpg", cfg.jpeg_quality))
        source = {"font": str(font), "font_sha256": hashlib.sha256(font.read_bytes()).hexdigest(),
                  "license": "SIL Open Font License 1.1 (Noto Color Emoji)", "seed": SEED, "size": cfg.size,
                  "classes": [c.identity for c, _ in picked], "train": args.train, "test": args.test,
                  "unseen_by": "BiT-Mini-R26x0.5 (none of these names is among its labels)",
                  "command": "python tools/make_demo_emoji.py " + str(args.out)}
        add("emoji/SOURCE.json", json.dumps(source, indent=1).encode())
    print(json.dumps({"out": str(args.out), "classes": source["classes"], "bytes": args.out.stat().st_size}))


if __name__ == "__main__":
    main()
