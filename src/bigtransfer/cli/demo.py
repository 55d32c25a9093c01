"""`bigtransfer demo`: few-shot transfer of BiT-Mini to new emoji and to handwritten digits, beside training from scratch."""

from __future__ import annotations

import argparse

from ..core.validate import check_out_folder
from ..transfer.config import DemoSettings
from .options import add_options, add_quiet, config_from

HELP = ("Run the demo: fine-tune the bundled BiT-Mini and the same architecture from scratch on 1/5/10 images per "
        "class of two tasks (10 emoji BiT-Mini never saw upstream; scikit-learn's handwritten digits), written out as "
        "image files, 3 seeds; a few minutes on a CPU.")


def register(p: argparse.ArgumentParser) -> None:
    """Add this verb's options: --out, one per setting of DemoSettings, --quiet."""
    p.add_argument("--out", default="bigtransfer-demo", metavar="DIR",
                   help="where the images and the runs go (default ./bigtransfer-demo)")
    add_options(p, DemoSettings)
    add_quiet(p, "print only the data, the settings and the results")


def run(args: argparse.Namespace) -> int:
    """Run the demo and print where everything went."""
    # Loads torch: imported here, not when the command line is built (start-up time, bench_cli_startup.py).
    from ..transfer.demo import run_demo

    settings = config_from(DemoSettings, args)
    settings.validate()
    check_out_folder(args.out)
    run_demo(args.out, settings, quiet=args.quiet)
    return 0
