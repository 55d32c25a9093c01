"""`bigtransfer embed DIR --out features.npy`: pre-logits of every image in a folder, plus the file list."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.errors import UserError
from .options import add_quiet
from .predict import add_model_options, check_model_options, input_config, input_files, report_skip

HELP = "Compute pre-logit features (N x 2048*width) for every image under a folder; writes .npy + file list."


def register(p: argparse.ArgumentParser) -> None:
    """Add this verb's options."""
    p.add_argument("inputs", nargs="+", metavar="DIR", help="folders (searched recursively) and/or image files")
    add_model_options(p)
    p.add_argument("--out", type=Path, required=True, help="features file to write (.npy); the file list goes to "
                                                            "<out stem>.files.txt beside it, one name per line as "
                                                            "the file system stores it (bytes, usually UTF-8)")
    add_quiet(p, "no progress bar")


def files_list_path(out: Path) -> Path:
    """Where the row-order file list of a features file goes: features.npy -> features.files.txt."""
    return out.with_name(out.stem + ".files.txt")


def run(args: argparse.Namespace) -> int:
    """Embed the images and write both files atomically."""
    import numpy as np

    from ..core.atomic import atomic_group
    from ..core.paths import name_bytes, shown
    from ..core.validate import check_out_file
    from ..deploy.inference import embed_files, load_model

    if args.out.suffix.lower() != ".npy":
        raise UserError(f"{args.out}: --out must end in .npy")
    check_out_file(args.out)
    check_out_file(files_list_path(args.out), "the file list beside --out")
    check_model_options(args)
    files, problems = input_files(args.inputs, "embed")
    # The row list has one name per line: a name holding a newline could not be told from two.
    newline = [f for f in files if "\n" in str(f)]
    for f in newline:
        print(f"skipped {shown(repr(str(f)))}: its name holds a newline, which the row list cannot hold", file=sys.stderr)
    files = [f for f in files if "\n" not in str(f)]
    if not files:
        return 1
    model = load_model(args.model, args.weights)
    config = input_config(args, model)
    size = config["input_size"][1]

    emb = embed_files(model, files, config, batch_size=args.batch, workers=args.workers, precision=args.precision,
                      engine=args.engine, device=args.device, progress=not args.quiet, on_skip=report_skip)
    if not emb.files:
        print(f"none of the {len(files)} files could be decoded; nothing written", file=sys.stderr)
        return 1
    listing = files_list_path(args.out)
    # Both or neither: a features file without its row list (or beside an older one) would look valid.
    with atomic_group(args.out, listing) as (tmp_features, tmp_listing):
        with open(tmp_features, "wb") as f:
            np.save(f, emb.features)
        tmp_listing.write_bytes(b"".join(name_bytes(f) + b"\n" for f in emb.files))
    print(f"wrote {shown(str(args.out))} ({emb.features.shape[0]} x {emb.features.shape[1]} float32, {size}x{size} px) "
          f"and {shown(str(listing))}; {len(emb.skipped) + len(problems) + len(newline)} skipped")
    return 0
