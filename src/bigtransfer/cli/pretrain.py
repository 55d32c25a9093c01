"""`bigtransfer pretrain`: upstream pre-training with the BiT recipe, on one process or many (torchrun)."""

from __future__ import annotations

import argparse
import os

from ..upstream.pretrain import LOSS_SETTINGS, PRECISIONS, PRESETS, PretrainConfig, run_pretrain
from .options import config_from, use_defaults

HELP = ("Pre-train a BiT model from scratch (BiT-S/M/L recipe); scale out with "
        "'torchrun --nproc_per_node N -m bigtransfer pretrain ...'.")


def register(p: argparse.ArgumentParser) -> None:
    """Add this verb's options."""
    p.add_argument("--data", required=True,
                   help="multi-label JSONL manifest ({\"path\":..., \"labels\": [...]}), image folder, CSV/JSONL "
                        "manifest or .npz")
    p.add_argument("--model", required=True, help="model name or architecture, e.g. R50x1 or BiT-M-R50x1 (random init)")
    p.add_argument("--out", required=True, help="run folder: config.json, metrics.jsonl, summary.json, plots, "
                                                "state.pt (resumed when present), checkpoint.safetensors; locked "
                                                "while a run uses it (rank 0 holds OUT/.lock)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="upstream recipe: decay epochs, default length, batch 4096, 224 px (default %(default)s)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, help="passes over the training set (default: the preset's 90 or 40)")
    length.add_argument("--steps", type=int, help="number of updates instead of --epochs")
    p.add_argument("--batch", type=int, help="global batch over all processes (default 4096; lr = 0.03 x batch/256)")
    p.add_argument("--batch-split", type=int, metavar="Q",
                   help="micro-batches per update on each process (gradient accumulation; exact with GroupNorm)")
    p.add_argument("--resolution", type=int, help="training and evaluation size in pixels (default 224)")
    p.add_argument("--loss", choices=LOSS_SETTINGS,
                   help="auto (default): softmax CE for single-label data, sigmoid CE (head bias -10) for multi-label")
    p.add_argument("--warmup-steps", type=int, help="linear warmup updates (default: the share of images of 5000 at "
                                                    "batch 4096, i.e. 5000 x 4096 / batch for a full-length run, "
                                                    "proportionally fewer for a shorter one)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 0.03 x batch / 256)")
    p.add_argument("--weight-decay", type=float, help="L2 weight decay (default %(default)s, on all weights)")
    p.add_argument("--no-decay-norm-bias", action="store_true", help="exempt GroupNorm and bias parameters from decay")
    p.add_argument("--seed", type=int, help="seed of weights, data order and augmentation (default %(default)s)")
    p.add_argument("--holdout", type=float,
                   help="fraction held out for evaluation when the data has no val/test split (default %(default)s)")
    p.add_argument("--eval-every", type=int, metavar="N", help="evaluate every N updates (default: 10 times a run)")
    p.add_argument("--max-eval", type=int, metavar="N", help="evaluate on at most N held-out images")
    p.add_argument("--save-every", type=int, metavar="N", help="save the resumable state every N updates")
    p.add_argument("--log-every", type=int, metavar="N", help="log the training loss every N updates")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="end this job after update N with the state saved (for time-limited job slots); rerun to go on")
    p.add_argument("--fsdp", action="store_true", help="shard weights, gradients and momentum (FSDP FULL_SHARD)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each unit's activations in backward (less memory, ~1/3 more compute)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="train in the NCHW layout instead of the (faster) channels-last one")
    p.add_argument("--precision", choices=PRECISIONS, help="fp32 (default) or bf16 autocast")
    p.add_argument("--workers", type=int, help="image-decoding processes per training process (default %(default)s)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), help="auto: GPUs when present")
    p.add_argument("--check-images", action="store_true", help="decode every image once before training")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    use_defaults(p, PretrainConfig)


def run(args: argparse.Namespace) -> int:
    """Run (or resume) pre-training."""
    config = config_from(PretrainConfig, args, decay_norm_and_bias=not args.no_decay_norm_bias)
    summary = run_pretrain(config, progress=not args.quiet)
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
