"""`bigtransfer convert IN OUT`: between the authors' .npz, our .safetensors and timm/HF state dicts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "Convert weights between the authors' .npz, bigtransfer .safetensors and timm/HF state dicts."


def register(p: argparse.ArgumentParser) -> None:
    """Add this verb's options."""
    p.add_argument("input", type=Path, help="checkpoint to read (.npz, .safetensors, .pt/.pth/.bin)")
    p.add_argument("output", type=Path, help="file to write: .safetensors (ours) or .npz (the authors' layout)")
    p.add_argument("--labels", type=Path, help="text file with one class name per line, stored as metadata")
    p.add_argument("--ws-eps", type=float, help="weight-standardization eps to record (default: the source's)")
    p.add_argument("--fp16", action="store_true", help="store floating-point weights as float16")


def run(args: argparse.Namespace) -> int:
    """Convert one file."""
    import torch

    from ..checkpoints import infer_arch, model_metadata, read_checkpoint, write_npz, write_safetensors
    from ..models import WS_EPS_RELEASE, ResNetV2

    state, meta = read_checkpoint(args.input)
    arch = infer_arch(state, str(args.input))
    if "head.weight" not in state:
        raise ValueError(f"{args.input}: missing the classifier head (head.weight)")
    eps = args.ws_eps if args.ws_eps is not None else float(meta.get("ws_eps", WS_EPS_RELEASE))
    model = ResNetV2(arch, int(state["head.weight"].shape[0]), ws_eps=eps)
    from ..checkpoints import load_state

    load_state(model, state, str(args.input))  # validates every key and shape
    if args.labels:
        model.labels = args.labels.read_text().splitlines()
    elif "labels" in meta:
        model.labels = json.loads(meta["labels"])
    suffix = args.output.suffix.lower()
    if suffix == ".npz":
        write_npz(model.state_dict(), args.output)
    elif suffix == ".safetensors":
        source = meta.get("source", args.input.suffix.lstrip("."))
        write_safetensors(model.state_dict(), args.output, model_metadata(model, source=source),
                          dtype=torch.float16 if args.fp16 else None)
    else:
        raise ValueError(f"{args.output}: output must end in .safetensors or .npz")
    print(f"wrote {args.output} ({arch.name}, {model.num_classes} classes, ws_eps {eps:g})")
    return 0
