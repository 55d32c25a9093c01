"""`bigtransfer convert IN OUT`: between the authors' .npz, our .safetensors and timm/HF state dicts."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError

HELP = "Convert weights between the authors' .npz, bigtransfer .safetensors and timm/HF state dicts."


def register(p: argparse.ArgumentParser) -> None:
    """Add this verb's options."""
    p.add_argument("input", type=Path, help="checkpoint to read (.npz, .safetensors, .pt/.pth/.bin)")
    p.add_argument("output", type=Path, help="file to write: .safetensors (ours) or .npz (the authors' layout)")
    p.add_argument("--labels", type=Path, help="text file with one class name per line, stored as metadata")
    p.add_argument("--ws-eps", type=float, help="weight-standardization eps to record (default: the source's)")
    p.add_argument("--fp16", action="store_true", help="store floating-point weights as float16")


def read_label_file(path: Path) -> list[str]:
    """Class names, one per line, from a UTF-8 text file; the error names the file."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); --labels takes one class name "
                        "per line, UTF-8 encoded") from None


def run(args: argparse.Namespace) -> int:
    """Convert one file."""
    import torch

    from ..checkpoints import (
        infer_arch,
        load_state,
        meta_labels,
        meta_ws_eps,
        model_metadata,
        read_checkpoint,
        write_npz,
        write_safetensors,
    )
    from ..checks import check_out_file
    from ..models import ResNetV2

    suffix = args.output.suffix.lower()
    if suffix not in (".npz", ".safetensors"):
        raise UserError(f"{args.output}: output must end in .safetensors or .npz")
    check_out_file(args.output)
    labels = read_label_file(args.labels) if args.labels else None
    state, meta = read_checkpoint(args.input)
    arch = infer_arch(state, str(args.input))
    if "head.weight" not in state:
        raise UserError(f"{args.input}: missing the classifier head (head.weight)")
    eps = args.ws_eps if args.ws_eps is not None else meta_ws_eps(meta, args.input)
    model = ResNetV2(arch, int(state["head.weight"].shape[0]), ws_eps=eps)
    load_state(model, state, str(args.input))  # validates every key, shape and value
    if labels is not None:
        if len(labels) != model.num_classes:
            raise UserError(f"{args.labels}: {len(labels)} class names, but {args.input} has {model.num_classes} "
                            "classes; give one name per class, one per line")
        model.labels = labels
    else:
        model.labels = meta_labels(meta, args.input, model.num_classes)
    if suffix == ".npz":
        write_npz(model.state_dict(), args.output)
    else:
        source = meta.get("source", args.input.suffix.lstrip("."))
        write_safetensors(model.state_dict(), args.output, model_metadata(model, source=source),
                          dtype=torch.float16 if args.fp16 else None)
    print(f"wrote {args.output} ({arch.name}, {model.num_classes} classes, ws_eps {eps:g})")
    return 0
