"""`bigtransfer hyperrule`: print the BiT-HyperRule plan for a dataset size and image shape."""

from __future__ import annotations

import argparse

from ..core.errors import UserError

HELP = "Print the BiT-HyperRule fine-tuning plan (resolution, schedule, lr, MixUp) for a dataset."


def register(p: argparse.ArgumentParser) -> None:
    """Add this verb's options."""
    what = p.add_argument_group("the dataset (give --examples and --image-size, or --data)")
    what.add_argument("--examples", type=int, metavar="N", help="number of training examples")
    what.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="typical image height and width")
    what.add_argument("--data", help="an image folder, manifest or .npz: count its training examples and measure them")
    what.add_argument("--examples-per-class", type=int, metavar="K", help="with --data: a K-shot subset")
    p.add_argument("--batch", type=int, default=512, help="global batch size (default 512; lr and steps are scaled)")
    p.add_argument("--steps", type=int, help="override the number of updates; phases move proportionally")
    p.add_argument("--variant", choices=("release", "paper"), default="release",
                   help="the authors' released code (default) or the paper's statement")
    p.add_argument("--arch", help="model name or architecture (the paper uses 512/480 px for R152x4)")
    p.add_argument("--base-lr", type=float, default=0.003, help="lr at batch 512 (default 0.003)")


def run(args: argparse.Namespace) -> int:
    """Print the plan."""
    from ..transfer.hyperrule import make_plan

    if args.data is not None:
        if args.examples is not None or args.image_size is not None:
            raise UserError("give either --data or --examples with --image-size, not both")
        from ..data.datasets import image_size_of, load_splits

        splits = load_splits(args.data, examples_per_class=args.examples_per_class, check_images=False)
        n, size = len(splits.train), image_size_of(splits)
        print(f"{args.data}: {n} training examples in {len(splits.classes)} classes, typical size {size[0]}x{size[1]}")
    else:
        if args.examples is None or args.image_size is None:
            raise UserError("need --examples N and --image-size H W (or --data DIR)")
        if args.examples_per_class is not None:
            raise UserError("--examples-per-class needs --data")
        n, size = args.examples, tuple(args.image_size)
        if min(size) < 1:
            raise UserError(f"--image-size must be positive, got {size[0]} {size[1]}")
    print(make_plan(n, size, batch=args.batch, steps=args.steps, variant=args.variant, base_lr=args.base_lr,
                    arch=args.arch).describe())
    return 0
