"""`bigtransfer demo`: few-shot fine-tuning on scikit-learn's handwritten digits, in about a minute on a CPU."""

from __future__ import annotations

import argparse

HELP = "Run the demo: few-shot fine-tuning on handwritten digits (from scikit-learn) written out as PNG files."


def register(p: argparse.ArgumentParser) -> None:
    """Add this verb's options."""
    from ..demo import DemoSettings

    d = DemoSettings()
    p.add_argument("--out", default="bigtransfer-demo", metavar="DIR",
                   help="where the digits and the runs go (default ./bigtransfer-demo)")
    p.add_argument("--shots", type=int, default=d.shots, metavar="K", help=f"images per class (default {d.shots})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"updates per run (default {d.steps})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"batch size (default {d.batch})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"picks the K-shot subset and data order (default {d.seed})")
    p.add_argument("--quiet", action="store_true", help="print only the data, the settings and the results")


def run(args: argparse.Namespace) -> int:
    """Run the demo and print where everything went."""
    from ..demo import DemoSettings, run_demo

    for name in ("shots", "steps", "batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    run_demo(args.out, DemoSettings(shots=args.shots, steps=args.steps, batch=args.batch, seed=args.seed),
             quiet=args.quiet)
    return 0
