"""`bigtransfer predict IMAGE...`: top-k labels with softmax scores; undecodable files are named and skipped."""

from __future__ import annotations

import argparse
import sys

from ..core.errors import UserError
from ..core.paths import shown
from ..engine.precision import UNSCALED_PRECISIONS
from .options import resolution_from

# bigtransfer.deploy.engines.ENGINES, named here so that --help does not import torch (a test keeps them equal).
ENGINE_CHOICES = ("torch", "compile", "onnxruntime")

HELP = "Classify images (files or folders) with a model: top-k labels with softmax scores."


def add_model_options(p: argparse.ArgumentParser,
                      resolution_default: str = "what the checkpoint records (fine-tuning: its evaluation crop); "
                                                "480 for *-ILSVRC2012, 128 for *-CIFAR10, timm's for timm names, "
                                                "else 224") -> None:
    """--model/--weights/--resolution/--precision/--engine/--batch/--workers/--device, shared by the inference verbs."""
    p.add_argument("--model", help="model name (see 'bigtransfer models'); optional when --weights is given")
    p.add_argument("--weights", help="checkpoint file (.safetensors, .npz, .pt/.pth/.bin)")
    p.add_argument("--resolution", type=int, nargs="+", metavar="N",
                   help=f"CROP (PRECROP CROP is accepted when equal: no pre-crop here): squash-resize images to "
                        f"CROP x CROP (default: {resolution_default})")
    p.add_argument("--precision", choices=UNSCALED_PRECISIONS, default="fp32", help="inference precision (default "
                                                                                    "fp32)")
    p.add_argument("--engine", choices=ENGINE_CHOICES, default="torch",
                   help="torch (default); compile: the same model compiled by torch.compile (the first batch of each "
                        "image size compiles for about a minute on a CPU, where a C++ compiler is needed; worth it for "
                        "thousands of images); onnxruntime: our ONNX export run by onnxruntime, fp32 on the CPU, "
                        "checked against the eager model on the first batch (pip install 'bigtransfer[onnx]')")
    p.add_argument("--batch", type=int, default=32, metavar="N", help="images per forward pass (default 32)")
    p.add_argument("--workers", type=int, metavar="N", help="decoding processes (default: one per core, at most 8)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")


def check_resolution(args: argparse.Namespace) -> None:
    """Turn --resolution's numbers into one size (`options.resolution_from`); refuse one below 1 before anything is
    loaded."""
    if isinstance(args.resolution, list):
        args.resolution = resolution_from(args.resolution, precrop=False)
    if args.resolution is not None and args.resolution < 1:
        raise UserError(f"--resolution must be positive, got {args.resolution}")


def check_model_options(args: argparse.Namespace) -> None:
    """check_resolution, and the engine with its precision and device, before any file or model is read."""
    from ..deploy.engines import check_engine

    check_resolution(args)
    check_engine(args.engine, args.precision, args.device)


def input_config(args: argparse.Namespace, model) -> dict:
    """The data config the model carries (see bigtransfer.model.preprocess), its size replaced by --resolution if given."""
    from ..model.preprocess import resolve_data_config

    check_resolution(args)
    return resolve_data_config(model, resolution=args.resolution)


def input_files(inputs: list[str], what: str) -> tuple[list, list]:
    """(files, problems) for the image files and folders in `inputs`, each problem printed; says so if none."""
    from ..deploy.inference import expand_inputs

    files, problems = expand_inputs(inputs)
    for s in problems:
        print(f"skipped {shown(s.path)}: {s.reason}", file=sys.stderr)
    if not files:
        print(f"no images to {what}", file=sys.stderr)
    return files, problems


def report_skip(s) -> None:
    """Name a file that could not be decoded, above the progress bar rather than through it."""
    from tqdm.auto import tqdm

    tqdm.write(f"skipped {shown(s.path)}: {s.reason}", file=sys.stderr)


def register(p: argparse.ArgumentParser) -> None:
    """Add this verb's options."""
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    add_model_options(p)
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="classes to show per image (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")


def run(args: argparse.Namespace) -> int:
    """Predict every image; exit 0 if at least one was classified."""
    from ..deploy.inference import label_names, load_model, predict_files
    from ..engine.metrics import to_json

    check_model_options(args)
    files, problems = input_files(args.images, "classify")
    if not files:
        return 1
    model = load_model(args.model, args.weights)
    size = input_config(args, model)
    labels, why = label_names(model, args.model)
    if why:
        print(f"note: {why}", file=sys.stderr)
    preds, skipped = predict_files(model, files, size, top_k=args.top_k, labels=labels, batch_size=args.batch,
                                   workers=args.workers, precision=args.precision, device=args.device,
                                   engine=args.engine, progress=len(files) > args.batch and sys.stderr.isatty(),
                                   on_skip=report_skip)
    if args.json:
        doc = [{"file": p.path, "top": [{"index": i, "label": name, "score": score} for i, name, score in p.top]}
               for p in preds]
        print(to_json(doc, indent=1))
    else:
        for p in preds:
            print(shown(p.path))
            for i, name, score in p.top:
                print(f"  {score:8.4f}  {shown(name) if name is not None else '-'}  (class {i})")
    n_bad = len(skipped) + len(problems)
    if n_bad:
        print(f"{len(preds)} image{'s' * (len(preds) != 1)} classified, {n_bad} skipped", file=sys.stderr)
    return 0 if preds else 1
