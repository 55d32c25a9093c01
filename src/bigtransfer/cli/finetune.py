"""`bigtransfer finetune`: fine-tune a BiT model on an image folder with the BiT-HyperRule (resumable)."""

from __future__ import annotations

import argparse

from ..transfer.config import FinetuneConfig
from .options import add_options, config_from

HELP = "Fine-tune a BiT model on your images with the BiT-HyperRule; re-run the same command to resume."


def register(p: argparse.ArgumentParser) -> None:
    """Add this verb's options: one per setting of FinetuneConfig."""
    add_options(p, FinetuneConfig)


def run(args: argparse.Namespace) -> int:
    """Run (or resume) one fine-tuning."""
    # Loads torch: imported here, not when the command line is built (start-up time, bench_cli_startup.py).
    from ..transfer.finetune import run_finetune

    summary = run_finetune(config_from(FinetuneConfig, args))
    print(f"checkpoint: {summary['checkpoint']}")
    if summary["plots"]:
        print(f"plots: {', '.join(summary['plots'])}")
    return 0
