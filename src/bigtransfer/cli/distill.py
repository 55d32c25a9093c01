"""`bigtransfer distill`: teach a small student a teacher's function (consistent, patient distillation; resumable)."""

from __future__ import annotations

import argparse

from ..transfer.config import DistillConfig
from .options import add_options, config_from

HELP = ("Distil a teacher (e.g. your fine-tuned BiT) into a smaller student: both see the same augmented view, the "
        "loss is KL(teacher || student); labels are not needed. Re-run the same command to resume.")


def register(p: argparse.ArgumentParser) -> None:
    """Add this verb's options: one per setting of DistillConfig (and --no-clip)."""
    add_options(p, DistillConfig)
    p.add_argument("--no-clip", dest="clip_norm", action="store_const", const=None, help="no gradient clipping")


def run(args: argparse.Namespace) -> int:
    """Run (or resume) one distillation."""
    # Loads torch: imported here, not when the command line is built (start-up time, bench_cli_startup.py).
    from ..transfer.distill import run_distill

    summary = run_distill(config_from(DistillConfig, args))
    print(f"checkpoint: {summary['checkpoint']}")
    return 0
