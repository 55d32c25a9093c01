"""`bigtransfer finetune`: fine-tune a BiT model on an image folder with the BiT-HyperRule (resumable)."""

from __future__ import annotations

import argparse

from ..engine.device import PRECISIONS
from ..transfer.finetune import FinetuneConfig, run_finetune
from .options import config_from, use_defaults

HELP = "Fine-tune a BiT model on your images with the BiT-HyperRule; re-run the same command to resume."


def register(p: argparse.ArgumentParser) -> None:
    """Add this verb's options."""
    p.add_argument("--data", required=True, metavar="DIR",
                   help="one sub-folder of images per class; or train/ with val/ or test/; or a .csv/.jsonl manifest "
                        "(path,label) or an .npz (images, labels)")
    p.add_argument("--model", required=True, metavar="NAME",
                   help="a name from 'bigtransfer models' (released names load their weights) or R<depth>x<width> "
                        "(from scratch unless --weights)")
    p.add_argument("--weights", metavar="PATH", help="start from this checkpoint (.npz, .safetensors, .pt)")
    p.add_argument("--out", required=True, metavar="RUN",
                   help="run directory (created; re-run to resume; locked while a run uses it: one process at a time)")
    p.add_argument("--examples-per-class", type=int, metavar="K", help="few-shot: K training images per class")
    p.add_argument("--seed", type=int, help="picks the K-shot subset, split, data order (default %(default)s)")
    p.add_argument("--steps", type=int, metavar="S", help="number of updates (default: the HyperRule's)")
    p.add_argument("--batch", type=int, metavar="B", help="global batch size (default %(default)s)")
    p.add_argument("--batch-split", type=int, metavar="Q",
                   help="accumulate each batch over Q micro-batches to save memory (default %(default)s)")
    p.add_argument("--resolution", type=int, nargs=2, metavar=("PRECROP", "CROP"),
                   help="squash-resize to PRECROP, train on random CROP crops (default: the model's recommended "
                        "resolution, else the HyperRule's)")
    p.add_argument("--no-flip", dest="flip", action="store_false",
                   help="no random horizontal flips (for images whose mirror image is another class)")
    p.add_argument("--no-crop", dest="crop", action="store_false",
                   help="no random crops: squash straight to CROP (for tasks about position or count)")
    p.add_argument("--precision", choices=PRECISIONS, help="default %(default)s")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each unit's activations in backward: about 1/4 of the activation memory, ~20%% slower")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="train in the NCHW layout instead of the (faster) channels-last one")
    p.add_argument("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--eval-every", type=int, metavar="N", help="evaluate every N steps (default: 5 times per run)")
    p.add_argument("--save-every", type=int, metavar="N", help="save the resume state every N steps "
                                                                "(default: at each evaluation)")
    p.add_argument("--workers", type=int, metavar="N", help="data loading processes (default: CPUs, at most 8)")
    p.add_argument("--variant", choices=("release", "paper"),
                   help="HyperRule as in the authors' release (default) or as the paper states it")
    p.add_argument("--base-lr", type=float,
                   help="lr at batch 512, scaled by B/512 (default: the model's recommended value, e.g. BiT-Mini's; "
                        "else the HyperRule's 0.003)")
    p.add_argument("--val-fraction", type=float,
                   help="share of each class held out for evaluation when there is no val/ or test/ (default "
                        "%(default)s)")
    p.add_argument("--strict", action="store_true", help="refuse to train if any image is unreadable")
    p.add_argument("--quiet", action="store_true", help="plain log lines instead of a progress bar")
    p.add_argument("--overwrite", action="store_true", help="discard what RUN holds and start afresh")
    use_defaults(p, FinetuneConfig)


def run(args: argparse.Namespace) -> int:
    """Run (or resume) one fine-tuning."""
    config = config_from(FinetuneConfig, args, resolution=tuple(args.resolution) if args.resolution else None)
    summary = run_finetune(config)
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"plots: {', '.join(summary['plots'])}")
    return 0
