"""`bigtransfer models`: list the model names and what they are."""

from __future__ import annotations

import argparse

HELP = "List every model name create_model accepts, with architecture, head size and weights."


def register(p: argparse.ArgumentParser) -> None:
    """Add this verb's options."""
    p.add_argument("--params", action="store_true", help="also count parameters (builds each model; slow)")


def run(args: argparse.Namespace) -> int:
    """List the models."""
    from ..model.registry import list_models, resolve
    from ..model.resnetv2 import ResNetV2, count_parameters

    names = list_models()
    width = max(28, *(len(n) for n in names))
    print(f"{'name':{width}s} {'arch':8s} {'classes':>7s}  weights" + ("       params" if args.params else ""))
    for name in names:
        info = resolve(name)
        where = "bundled" if info.path else ("download" if info.url else ("hub" if info.hub else "-"))
        line = f"{name:{width}s} {info.arch.name:8s} {info.num_classes:7d}  {where:8s}"
        if args.params:
            line += f" {count_parameters(ResNetV2(info.arch, info.num_classes)) / 1e6:10.2f}M"
        print(line)
    print("Any R<depth>x<width> is accepted too: depth 14, 26, 50, 101 or 152; width a multiple of 0.5.")
    print("'hub' weights come through huggingface_hub (pip install 'bigtransfer[hub]'); so does any BiT repository "
          "'org/name' on the Hugging Face hub.")
    return 0
