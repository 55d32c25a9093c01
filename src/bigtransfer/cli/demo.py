"""`bigtransfer demo`: few-shot transfer of BiT-Mini to scikit-learn's handwritten digits, beside training from scratch."""

from __future__ import annotations

import argparse

from ..core.errors import UserError

HELP = ("Run the demo: fine-tune the bundled BiT-Mini and the same architecture from scratch on 1/5/10 handwritten "
        "digits per class (scikit-learn's, written out as PNG files), 3 seeds; a few minutes on a CPU.")


def register(p: argparse.ArgumentParser) -> None:
    """Add this verb's options."""
    from ..transfer.demo import DemoSettings

    d = DemoSettings()
    p.add_argument("--out", default="bigtransfer-demo", metavar="DIR",
                   help="where the digits and the runs go (default ./bigtransfer-demo)")
    p.add_argument("--shots", type=int, nargs="+", default=list(d.shots), metavar="K",
                   help=f"images per class (default {' '.join(map(str, d.shots))})")
    p.add_argument("--seeds", type=int, default=d.seeds, help=f"runs per K and model (default {d.seeds})")
    p.add_argument("--processes", type=int, default=None, help="fine-tunes side by side (default: one per core)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"updates per run (default {d.steps})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"batch size (default {d.batch})")
    p.add_argument("--quiet", action="store_true", help="print only the data, the settings and the results")


def run(args: argparse.Namespace) -> int:
    """Run the demo and print where everything went."""
    from ..core.validate import check_out_folder
    from ..transfer.demo import DemoSettings, run_demo

    for name in ("seeds", "steps", "batch", "processes"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if min(args.shots) < 1:
        raise UserError(f"--shots must be positive integers, got {args.shots}")
    check_out_folder(args.out)
    run_demo(args.out, DemoSettings(shots=tuple(args.shots), seeds=args.seeds, steps=args.steps, batch=args.batch,
                                    processes=args.processes), quiet=args.quiet)
    return 0
