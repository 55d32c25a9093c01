"""`bigtransfer pack SRC OUT`: decode a shard set (or a corpus's train/ and val/) once into uint8 arrays."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Decode a shard set or corpus once into packed uint8 arrays that 'pretrain' reads with no decoding workers."


def register(p: argparse.ArgumentParser) -> None:
    """Add this verb's options."""
    p.add_argument("source", help="a shard set (folder with index.json) or a corpus folder holding train/ and val/")
    p.add_argument("out", help="folder to create: one packed set, or train/ and val/ packed sets for a corpus")
    p.add_argument("--size", type=int, help="squash-resize every image to SIZE x SIZE (default: the first image's width)")


def run(args: argparse.Namespace) -> int:
    """Pack every shard set found at args.source."""
    from ..data.packed import PackedError, open_packed, pack_shards
    from ..data.pretraining import find_shard_sets

    found = find_shard_sets(args.source)
    if found is None:
        raise PackedError(f"{args.source}: not a shard set nor a folder holding train/ (and val/) shard sets")
    train, held = found
    out = Path(args.out)
    targets = [(train, out)] if train == Path(args.source) else [(r, out / r.name) for r in (train, held) if r]
    for source, target in targets:
        pack_shards(source, target, args.size)
        packed = open_packed(target)
        print(f"{target}: {len(packed)} images {tuple(packed.images.shape[1:3])}, {len(packed.classes)} classes")
    return 0
