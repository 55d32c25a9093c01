"""`bigtransfer models`: list the model names and what they are."""

from __future__ import annotations

import argparse

HELP = "List every model name create_model accepts, with architecture, head size and weights."


def register(p: argparse.ArgumentParser) -> None:
    """Add this verb's options."""
    p.add_argument("--params", action="store_true", help="also count parameters (builds each model; slow)")
    p.add_argument("--filter", metavar="PATTERN",
                   help="only names matching PATTERN (case-insensitive): a glob such as 'vtab/*R50x1*run0*', or a "
                        "part of the name such as 'distill', 'vtab' or 'cifar100'")


def run(args: argparse.Namespace) -> int:
    """List the models."""
    from ..core.errors import UserError
    from ..model.preprocess import resolution_of
    from ..model.registry import list_models, resolve
    from ..model.resnetv2 import ResNetV2, count_parameters

    names = list_models(args.filter)
    if not names:
        raise UserError(f"no model name matches {args.filter!r}; 'bigtransfer models' lists them all")
    width = max(28, *(len(n) for n in names))
    print(f"{'name':{width}s} {'arch':8s} {'classes':>7s} {'res':>4s}  weights" + ("       params" if args.params else ""))
    for name in names:
        info = resolve(name)
        where = "bundled" if info.path else ("download" if info.url else ("hub" if info.hub else "-"))
        # The resolution the name's weights expect at evaluation, where known ("-": the task decides).
        res = str(resolution_of(info.data_config)) if info.data_config else "-"
        line = f"{name:{width}s} {info.arch.name:8s} {info.num_classes:7d} {res:>4s}  {where:8s}"
        if args.params:
            line += f" {count_parameters(ResNetV2(info.arch, info.num_classes)) / 1e6:10.2f}M"
        print(line)
    if args.filter is not None:
        return 0
    print("Any R<depth>x<width> is accepted too: depth 14, 26, 50, 101 or 152; width a multiple of 0.5.")
    print("'hub' weights come through huggingface_hub (pip install 'bigtransfer[hub]'); so does any BiT repository "
          "'org/name' on the Hugging Face hub.")
    return 0
