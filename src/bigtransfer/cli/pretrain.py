"""`bigtransfer pretrain`: upstream pre-training with the BiT recipe, on one process or many (torchrun)."""

from __future__ import annotations

import argparse
import os

from ..upstream.config import PretrainConfig
from .options import add_options, add_quiet, config_from

HELP = ("Pre-train a BiT model from scratch (BiT-S/M/L recipe); scale out with "
        "'torchrun --nproc_per_node N -m bigtransfer pretrain ...'.")


def register(p: argparse.ArgumentParser) -> None:
    """Add this verb's options: one per setting of PretrainConfig, and --quiet."""
    add_options(p, PretrainConfig)
    add_quiet(p, "no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run (or resume) pre-training."""
    # Loads torch: imported here, not when the command line is built (start-up time, bench_cli_startup.py).
    from ..upstream.pretrain import run_pretrain

    summary = run_pretrain(config_from(PretrainConfig, args), progress=not args.quiet)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return 0
    if summary.get("stopped_at"):
        print(f"stopped after update {summary['stopped_at']} of {summary['steps']}; run the same command to continue")
    else:
        metric = summary.get("eval_precision_at_1")
        ips = summary.get("images_per_s")
        loss = summary.get("final_loss")  # None only when the log of a finished run was deleted
        print(f"pre-trained {summary['steps']} updates on {summary['world_size']} process(es)"
              + (f": final loss {loss:.4f}" if loss is not None else "")
              + (f", held-out {summary['metric']} {metric:.4f}" if metric is not None else "")
              + (f", {ips:.1f} images/s" if ips else "") + f"; weights in {summary['checkpoint']}")
    return 0
