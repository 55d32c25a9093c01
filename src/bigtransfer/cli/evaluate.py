"""`bigtransfer evaluate PROTOCOL`: measure a checkpoint the way the paper does (frozen features, few-shot, VTAB).

Each protocol is an entry of PROTOCOLS: (help, register(parser), run(args) -> int). Adding one means adding its
three pieces here; the verb's parser is built from this table.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..engine.device import PRECISIONS
from ..evaluation.protocol_runs import TrainOptions
from .options import config_from, use_defaults
from .predict import add_model_options

HELP = "Evaluate a checkpoint: linear probe or k-NN on frozen pre-logits (cached), few-shot, VTAB."


def _register_frozen(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="image folder, train/ + val/ (or test/) folder, CSV/JSONL manifest "
                                                 "or .npz; without an evaluation split 20%% per class is held out")
    add_model_options(p, resolution_default="what the checkpoint records, else the HyperRule's evaluation crop: 128 "
                                             "for images under 96x96 px, else 480")
    p.add_argument("--examples-per-class", type=int, metavar="K", help="few-shot: K training images per class, "
                                                                         "chosen by --seed (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the K-shot subset and the validation split")
    p.add_argument("--out", required=True, help="folder for config.json and results.json (locked while in use)")
    p.add_argument("--cache", help="feature cache folder (default: 'features' in the download cache)")
    p.add_argument("--no-cache", action="store_true", help="always extract features, store nothing")


def _register_linear(p: argparse.ArgumentParser) -> None:
    _register_frozen(p)


def _register_knn(p: argparse.ArgumentParser) -> None:
    _register_frozen(p)
    p.add_argument("--k", type=int, default=10, help="neighbours that vote (default 10; capped at the training size)")


def _run_frozen(args: argparse.Namespace) -> int:
    from ..evaluation.linear import FrozenEvalConfig, run_frozen_eval

    run_frozen_eval(config_from(FrozenEvalConfig, args, method=args.protocol, use_cache=not args.no_cache))
    return 0


def _register_training(p: argparse.ArgumentParser) -> None:
    """The fine-tuning options shared by the fewshot and vtab protocols (each run is a `bigtransfer finetune`)."""
    p.add_argument("--model", required=True, metavar="NAME",
                   help="a name from 'bigtransfer models' or R<depth>x<width> (from scratch unless --weights)")
    p.add_argument("--weights", metavar="PATH", help="start every run from this checkpoint")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for every run, config.json and the results "
                                                                "(re-run the command to reuse finished runs; locked "
                                                                "while in use)")
    p.add_argument("--steps", type=int, metavar="S", help="updates per run (default: the HyperRule's)")
    p.add_argument("--batch", type=int, metavar="B", help="global batch size (default %(default)s)")
    p.add_argument("--batch-split", type=int, metavar="Q", help="micro-batches per batch (default %(default)s)")
    p.add_argument("--resolution", type=int, nargs=2, metavar=("PRECROP", "CROP"),
                   help="squash-resize to PRECROP, train on CROP crops (default: the HyperRule's)")
    p.add_argument("--precision", choices=PRECISIONS, help="default %(default)s")
    p.add_argument("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--workers", type=int, metavar="N", help="data loading processes (default: CPUs, at most 8)")
    p.add_argument("--variant", choices=("release", "paper"), help="HyperRule variant")
    p.add_argument("--base-lr", type=float,
                   help="lr at batch 512 (default: the model's recommended value, else the HyperRule's 0.003)")
    p.add_argument("--overwrite", action="store_true", help="re-run every run from scratch instead of reusing it")
    use_defaults(p, TrainOptions)


def _training(args: argparse.Namespace) -> TrainOptions:
    return config_from(TrainOptions, args, resolution=tuple(args.resolution) if args.resolution else None)


def _register_fewshot(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="image folder, train/ + val/ (or test/) folder, CSV/JSONL manifest "
                                                 "or .npz; without an evaluation split 20%% per class is held out "
                                                 "(the same for every seed)")
    _register_training(p)
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10, 25], metavar="K",
                   help="training images per class (default 1 5 10 25)")
    p.add_argument("--seeds", type=int, default=5, help="runs per K, each on another subset (default 5)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of each class held out for scoring when the data has no val/ or test/ (default 0.2)")


def _run_fewshot(args: argparse.Namespace) -> int:
    from ..evaluation.fewshot import FewShotConfig, run_fewshot

    run_fewshot(config_from(FewShotConfig, args, shots=tuple(args.shots), train=_training(args)))
    return 0


def _register_vtab(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, help="VTAB-1k copy: ROOT/<task>/{train800,val200,train800val200,test}, "
                                                 "each an image folder or a .csv/.jsonl manifest")
    _register_training(p)
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="only these tasks (default: all 19)")
    p.add_argument("--sweep", action="store_true", help="pick lr and steps per task on train800 -> val200 first "
                                                        "(a small grid; see --sweep-lr, --sweep-steps)")
    p.add_argument("--sweep-lr", type=float, nargs="+", metavar="LR", help="sweep lrs at batch 512 "
                                                                            "(default 0.001 0.003 0.01)")
    p.add_argument("--sweep-steps", type=int, nargs="+", metavar="S",
                   help="sweep lengths (default: --steps, else the HyperRule's)")
    p.add_argument("--tuned", action="store_true",
                   help="the paper's Appendix A protocol: per task, a random search on train800 -> val200 (lr "
                        "log-uniform 1e-4..1e-1, steps 500..16000, resolution 64..384, MixUp alpha 0..0.4; --steps "
                        "or --resolution fix that setting instead), the best retrained on all 1000")
    p.add_argument("--trials", type=int, default=40, help="random-search trials per task with --tuned (default 40)")
    p.add_argument("--seeds", type=int, default=3,
                   help="final runs per task; the score is their median, as the paper's (default 3; 1 is faster)")


def _run_vtab(args: argparse.Namespace) -> int:
    from ..evaluation.vtab import SWEEP_LRS, VtabConfig, run_vtab

    run_vtab(config_from(VtabConfig, args, sweep_lrs=tuple(args.sweep_lr) if args.sweep_lr else SWEEP_LRS,
                         sweep_steps=tuple(args.sweep_steps) if args.sweep_steps else None, train=_training(args)))
    return 0


PROTOCOLS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "linear": ("Linear probe: L2-regularized logistic regression on frozen pre-logits (strength chosen on a "
               "validation split).", _register_linear, _run_frozen),
    "knn": ("k-nearest neighbours (cosine similarity) on frozen pre-logits.", _register_knn, _run_frozen),
    "fewshot": ("Few-shot fine-tuning: a HyperRule fine-tune per K and seed; median, mean, min, max per K.",
                _register_fewshot, _run_fewshot),
    "vtab": ("VTAB-1k: per task, HyperRule settings (or picked on 800/200: --sweep, --tuned), final fine-tunes on "
             "1000 (3 seeds), median top-1 on test; group means.",
             _register_vtab, _run_vtab),
}


def register(p: argparse.ArgumentParser) -> None:
    """Add one sub-command per protocol."""
    sub = p.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    for name, (help_text, reg, fn) in PROTOCOLS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        reg(sp)
        sp.set_defaults(_protocol_run=fn)


def run(args: argparse.Namespace) -> int:
    """Run the chosen protocol."""
    return int(args._protocol_run(args) or 0)
