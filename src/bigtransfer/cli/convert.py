"""`bigtransfer convert IN OUT`: between the authors' .npz, our .safetensors and timm/HF transformers files.

The output format is --to, else chosen by OUT: `.npz` the authors' layout, `.safetensors` ours (weights plus
metadata), `.pth`/`.pt`/`.bin` a timm state dict, a path without a suffix an HF
transformers folder (config.json + model.safetensors, what `BitForImageClassification.from_pretrained` reads).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.errors import UserError

HELP = "Convert weights between the authors' .npz, bigtransfer .safetensors, timm state dicts and HF transformers folders."
FORMATS = ("bigtransfer", "npz", "timm", "hf")


def register(p: argparse.ArgumentParser) -> None:
    """Add this verb's options."""
    p.add_argument("input", type=Path, help="checkpoint to read (.npz, .safetensors, .pt/.pth/.bin, or an HF folder)")
    p.add_argument("output", type=Path, help="what to write: .safetensors (ours), .npz (the authors' layout), "
                                             ".pth/.pt/.bin (timm), a folder (HF transformers)")
    p.add_argument("--to", choices=FORMATS, help="output format (default: from OUTPUT, see above); "
                                                 "--to timm with a .safetensors OUTPUT writes timm's keys")
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


def output_format(output: Path, to: str | None) -> str:
    """The format to write: --to, else the one OUTPUT's suffix (or folder) names; the error lists the choices."""
    suffix = output.suffix.lower()
    by_suffix = {".npz": "npz", ".safetensors": "bigtransfer", ".pth": "timm", ".pt": "timm", ".bin": "timm"}
    guess = by_suffix.get(suffix) if suffix else "hf"
    fmt = to or guess
    if fmt is None:
        raise UserError(f"{output}: cannot tell the format from {suffix!r}; end it in .safetensors, .npz, .pth or "
                        "give a folder (HF transformers), or pass --to")
    if fmt in ("npz", "bigtransfer") and suffix != {"npz": ".npz", "bigtransfer": ".safetensors"}[fmt]:
        raise UserError(f"{output}: --to {fmt} writes a {'.npz' if fmt == 'npz' else '.safetensors'} file")
    if fmt == "timm" and suffix not in (".pth", ".pt", ".bin", ".safetensors"):
        raise UserError(f"{output}: --to timm writes a .pth, .pt, .bin or .safetensors file")
    if fmt == "hf" and output.is_file():
        raise UserError(f"{output}: --to hf writes a folder (config.json + model.safetensors), and this is a file")
    return fmt


def run(args: argparse.Namespace) -> int:
    """Convert one file."""
    import torch

    from ..core.validate import check_out_file
    from ..model.checkpoints import (
        infer_arch,
        load_state,
        meta_labels,
        meta_padding,
        meta_ws_eps,
        model_metadata,
        read_checkpoint,
        write_npz,
        write_peer,
        write_safetensors,
    )
    from ..model.preprocess import meta_data_config
    from ..model.resnetv2 import ResNetV2

    fmt = output_format(args.output, args.to)
    if fmt != "hf":
        check_out_file(args.output)
    labels = read_label_file(args.labels) if args.labels else None
    state, meta = read_checkpoint(args.input)
    arch = infer_arch(state, str(args.input))
    if "head.weight" not in state:
        raise UserError(f"{args.input}: missing the classifier head (head.weight)")
    eps = args.ws_eps if args.ws_eps is not None else meta_ws_eps(meta, args.input)
    model = ResNetV2(arch, int(state["head.weight"].shape[0]), ws_eps=eps, padding=meta_padding(meta, args.input))
    load_state(model, state, str(args.input))  # validates every key, shape and value
    model.data_config = meta_data_config(meta, args.input)
    if labels is not None:
        if len(labels) != model.num_classes:
            raise UserError(f"{args.labels}: {len(labels)} class names, but {args.input} has {model.num_classes} "
                            "classes; give one name per class, one per line")
        model.labels = labels
    else:
        model.labels = meta_labels(meta, args.input, model.num_classes)
    if fmt in ("npz", "timm") and model.padding != "fixed":
        raise UserError(f"{args.input}: {model.padding!r} padding cannot be said in the {fmt} format (only an HF "
                        "transformers config can); write --to hf or keep .safetensors")
    if fmt == "npz":
        write_npz(model.state_dict(), args.output)
    elif fmt == "bigtransfer":
        source = meta.get("source", args.input.suffix.lstrip("."))
        write_safetensors(model.state_dict(), args.output, model_metadata(model, source=source),
                          dtype=torch.float16 if args.fp16 else None)
    else:
        write_peer(model, args.output, fmt)
    note = f"; {fmt} standardizes with eps 1e-8" if fmt in ("hf", "timm") and eps != 1e-8 else ""
    print(f"wrote {args.output} ({fmt}: {arch.name}, {model.num_classes} classes, ws_eps {eps:g}{note})")
    return 0
