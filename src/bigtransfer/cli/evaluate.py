"""`bigtransfer evaluate PROTOCOL`: measure a checkpoint the way the paper does (frozen features, few-shot, VTAB).

Each protocol is an entry of PROTOCOLS: (help, register(parser), run(args) -> int). Adding one means adding its
three pieces here; the verb's parser is built from this table.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..evaluation.config import SHARED_SETTINGS, FewShotConfig, FrozenEvalConfig, TrainOptions, VtabConfig
from .options import add_options, config_from

# The frozen-feature options, in the order --help lists them (k-NN adds --k).
FROZEN_OPTIONS = ("data", "model", "weights", "resolution", "precision", "engine", "batch", "workers", "device",
                  "examples_per_class", "seed", "out", "cache", "use_cache", "overwrite")

HELP = "Evaluate a checkpoint: linear probe or k-NN on frozen pre-logits (cached), few-shot, VTAB."


def _register_frozen(p: argparse.ArgumentParser) -> None:
    add_options(p, FrozenEvalConfig, only=FROZEN_OPTIONS)


def _register_knn(p: argparse.ArgumentParser) -> None:
    add_options(p, FrozenEvalConfig, only=(*FROZEN_OPTIONS, "k"))


def _run_frozen(args: argparse.Namespace) -> int:
    # Loads torch: imported here, not when the command line is built (start-up time, bench_cli_startup.py).
    from ..evaluation.linear import run_frozen_eval

    run_frozen_eval(config_from(FrozenEvalConfig, args, method=args.protocol))
    return 0


def _register_training(p: argparse.ArgumentParser, config_class: type) -> None:
    """The fine-tuning options shared by the fewshot and vtab protocols (each run is a `bigtransfer finetune`)."""
    add_options(p, TrainOptions, only=("model", "weights"), weights={"help": "start every run from this checkpoint"})
    add_options(p, config_class, only=("out",))
    add_options(p, TrainOptions, only=[n for n in SHARED_SETTINGS if n not in ("model", "weights")],
                steps={"help": "updates per run (default: the HyperRule's)"})
    add_options(p, config_class, only=("overwrite",))


def _training(args: argparse.Namespace) -> TrainOptions:
    return config_from(TrainOptions, args)


def _register_fewshot(p: argparse.ArgumentParser) -> None:
    add_options(p, FewShotConfig, only=("data",))
    _register_training(p, FewShotConfig)
    add_options(p, FewShotConfig, only=("shots", "seeds", "val_fraction"))


def _run_fewshot(args: argparse.Namespace) -> int:
    from ..evaluation.fewshot import run_fewshot

    run_fewshot(config_from(FewShotConfig, args, train=_training(args)))
    return 0


def _register_vtab(p: argparse.ArgumentParser) -> None:
    add_options(p, VtabConfig, only=("root",))
    _register_training(p, VtabConfig)
    add_options(p, VtabConfig, only=("tasks", "sweep", "sweep_lrs", "sweep_steps", "tuned", "trials", "seeds"))


def _run_vtab(args: argparse.Namespace) -> int:
    from ..evaluation.vtab import run_vtab

    run_vtab(config_from(VtabConfig, args, train=_training(args)))
    return 0


PROTOCOLS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "linear": ("Linear probe: L2-regularized logistic regression on frozen pre-logits (strength chosen on a "
               "validation split).", _register_frozen, _run_frozen),
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
