"""`bigtransfer export`: ONNX or TorchScript with weight standardization folded in, checked before it is kept."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.errors import UserError

HELP = "Export a model to ONNX or TorchScript (any input size), verified against the eager model."


def register(p: argparse.ArgumentParser) -> None:
    """Add this verb's options."""
    p.add_argument("--weights", required=True, help="checkpoint to export (.safetensors, .npz, .pt/.pth/.bin)")
    p.add_argument("--model", help="model name, when the checkpoint does not say its architecture")
    p.add_argument("--format", choices=("onnx", "torchscript"), required=True, help="what to write")
    p.add_argument("--out", type=Path, required=True, help="file to write (e.g. model.onnx, model.pt)")
    p.add_argument("--dynamic-batch", action="store_true", default=True,
                   help="ONNX: any batch size (the default; kept for old scripts)")
    p.add_argument("--static-batch", dest="dynamic_batch", action="store_false",
                   help="ONNX: batch size fixed at 1")
    p.add_argument("--opset", type=int, help="ONNX opset (default 17)")
    p.add_argument("--rtol", type=float, default=1e-4,
                   help="largest accepted max|exported - eager| / max|eager| on the check inputs (default 1e-4)")


def run(args: argparse.Namespace) -> int:
    """Export, check at two input sizes, and report; exit 1 when the check fails."""
    from ..deploy.export import CHECK_SIZES, DEFAULT_OPSET, ExportError, export
    from ..deploy.inference import load_model

    if args.opset is not None and args.format != "onnx":
        raise UserError("--opset applies to --format onnx only")
    model = load_model(args.model, args.weights)
    try:
        check = export(model, args.out, args.format, dynamic_batch=args.dynamic_batch,
                       opset=args.opset or DEFAULT_OPSET, rtol=args.rtol)
    except ExportError as e:
        print(f"bigtransfer export: failed: {e}", file=sys.stderr)
        return 1
    what = f"{model.arch.name}, {model.num_classes} classes, weight standardization folded into the conv kernels"
    batch = "N" if args.dynamic_batch or args.format != "onnx" else "1"
    print(f"wrote {args.out} ({args.format}; {what}; input {batch} x 3 x H x W, any H and W)")
    if args.format == "onnx":
        from ..deploy.export import INPUT_NAME, onnx_metadata, output_name

        meta = onnx_metadata(model)
        print(f"input '{INPUT_NAME}' -> output '{output_name(model)}'; metadata: resolution {meta['resolution']}, "
              f"scaling {meta['input_scaling']}, {'class names' if 'labels' in meta else 'no class names'}")
    if check.checked:
        sizes = ", ".join(f"{k}: {v:.1e}" for k, v in check.rel_errors.items())
        print(f"checked against the eager model on random inputs: max relative error {sizes} (allowed {args.rtol:g})")
    else:
        sizes = " and ".join(f"{h}x{w}" for h, w in CHECK_SIZES)
        print(f"not checked: {check.note}; the eager model was not compared at {sizes}")
    return 0
