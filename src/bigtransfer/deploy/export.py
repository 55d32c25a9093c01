"""Export a BiT model to ONNX or TorchScript with weight standardization folded into plain convs, then verify it."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.atomic import atomic_path
from ..core.errors import UserError
from ..core.validate import check_out_file
from ..model.preprocess import resolution_of, resolve_data_config
from ..model.resnetv2 import ResNetV2
from .inference_model import prepare_for_inference

FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 17
# Opsets checked to export and reproduce the model; 20 is the newest the TorchScript-based exporter writes.
OPSETS = range(11, 21)
# The exported graph must reproduce the eager logits to this relative error (max |diff| / max |logit|).
DEFAULT_RTOL = 1e-4
# Sizes the exported file is checked at: two different shapes, one not square, so fixed H/W would be caught.
CHECK_SIZES = ((224, 224), (160, 96))
# Ops that compute a standardization; none of them may take a weight (a constant) as input after folding.
NORMALIZING_OPS = frozenset({"ReduceMean", "Sqrt", "Reciprocal", "Pow", "Div", "Sub", "BatchNormalization",
                             "LayerNormalization", "ReduceSumSquare", "ReduceSum"})
_PROTOBUF_LIMIT = 2 * 1024**3
INPUT_NAME = "pixels"  # (N, 3, H, W) float32, scaled as the file's metadata says
# Batches the exported graph is checked at when its batch is dynamic: 1 and a batch no example used.
CHECK_BATCHES = (1, 3)


def output_name(model: nn.Module) -> str:
    """'logits', or 'features' for a model without a head (its output is the pooled pre-logits)."""
    return "logits" if model.num_classes else "features"


def onnx_metadata(model: ResNetV2) -> dict[str, str]:
    """What a deployer needs besides the graph: class names, input size and scaling (ONNX metadata_props)."""
    config = resolve_data_config(model)
    mean, std = config["mean"], config["std"]
    scaling = "pixels / 127.5 - 1 (RGB in [-1, 1])" if mean == [0.5] * 3 and std == [0.5] * 3 else \
        f"(pixels / 255 - mean) / std per RGB channel, mean {mean}, std {std}"
    meta = {"arch": model.arch.name, "num_classes": str(model.num_classes),
            "resolution": str(config["input_size"][1]), "input_scaling": scaling, "mean": json.dumps(mean),
            "std": json.dumps(std), "interpolation": config["interpolation"], "crop": config["crop"],
            "data_config": json.dumps(config), "recorded": "yes" if model.data_config is not None else "no (default)"}
    if model.labels is not None:
        meta["labels"] = json.dumps(list(model.labels))
    return meta


def _add_metadata(path: str | os.PathLike, metadata: dict[str, str], name: str | os.PathLike) -> None:
    try:
        import onnx
    except ImportError:
        raise ExportError(f"{name}: writing the ONNX metadata (labels, resolution, scaling) needs the onnx package: "
                          "pip install onnx (or 'bigtransfer[export]')") from None
    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


class ExportError(UserError, RuntimeError):
    """An export that could not be written or did not reproduce the eager model; the message says why."""


@dataclass
class ExportCheck:
    """How the exported file compared with the eager model."""

    checked: bool
    rel_errors: dict[str, float] = field(default_factory=dict)  # "NxCxHxW" -> max |diff| / max |eager|
    note: str = ""

    @property
    def max_rel_error(self) -> float:
        """The worst relative error over all checked input sizes."""
        return max(self.rel_errors.values(), default=0.0)


def folded_module(model: ResNetV2) -> ResNetV2:
    """An eval copy of `model` whose standardized convs are plain convs holding the standardized kernels."""
    # The fast inference path already builds exactly this frozen copy; reuse it rather than a second version.
    return prepare_for_inference(_reference(model), precision="fp32", channels_last=False).frozen.eval()


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _reference(model: ResNetV2) -> ResNetV2:
    """The model as float32 on the CPU, copied only when it is not already (the caller's model is left alone)."""
    if all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters()):
        return model
    return copy.deepcopy(model).float().cpu()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the tracer's notes about shape checks inside GroupNorm and the exporters' deprecation notes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"Constant folding")
        yield


def write_onnx(module: nn.Module, path: str | os.PathLike, dynamic_batch: bool = True,
               opset: int = DEFAULT_OPSET, name: str | os.PathLike | None = None,
               metadata: dict[str, str] | None = None) -> None:
    """Write `module` as an ONNX graph 'pixels' -> 'logits' with dynamic height, width and (unless told) batch.

    `name`: the file to name in error messages (the final path when `path` is a temporary one). `metadata`: stored
    as the file's metadata_props.
    """
    name = name or path
    if opset not in OPSETS:
        raise ExportError(f"{name}: opset {opset} is not supported; choose {OPSETS.start} to {OPSETS.stop - 1}")
    if _param_bytes(module) >= _PROTOBUF_LIMIT:
        raise ExportError(f"{name}: the weights ({_param_bytes(module) / 1024**3:.1f} GiB) exceed ONNX's 2 GiB "
                          "single-file limit; export --format torchscript instead")
    out = output_name(module)
    axes = {INPUT_NAME: {2: "height", 3: "width"}, out: {}}
    if dynamic_batch:
        axes[INPUT_NAME][0] = "batch"
        axes[out][0] = "batch"
    example = torch.zeros(1, 3, 64, 64)
    try:
        with _quiet():
            # The TorchScript-based exporter: the torch.export-based one needs onnxscript, not a dependency here.
            torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=[INPUT_NAME],
                              output_names=[out], dynamic_axes=axes, opset_version=opset, do_constant_folding=True)
    except Exception as e:  # the exporter raises many types (RuntimeError, SymbolicValueError, ...)
        raise ExportError(f"{name}: ONNX export failed at opset {opset} ({type(e).__name__}: {e})") from None
    if metadata:
        _add_metadata(path, metadata, name)


def write_torchscript(module: nn.Module, path: str | os.PathLike, name: str | os.PathLike | None = None) -> None:
    """Write `module` as a traced TorchScript file; the trace holds no input shape, so any H and W work."""
    name = name or path
    try:
        with _quiet():
            traced = torch.jit.trace(module, torch.zeros(1, 3, 64, 64), check_trace=False)
            traced.save(str(path))
    except Exception as e:  # tracing failures come as RuntimeError or TracingCheckError
        raise ExportError(f"{name}: TorchScript export failed ({type(e).__name__}: {e})") from None


def default_check_sizes(model: ResNetV2) -> Sizes:
    """The model's own resolution and a non-square size, so fixed H/W in the graph would be caught."""
    r = resolution_of(resolve_data_config(model))
    return ((r, r), CHECK_SIZES[1]) if (r, r) != CHECK_SIZES[1] else CHECK_SIZES


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    """Largest absolute difference relative to the reference's largest magnitude (the check of every export)."""
    return float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))


Sizes = tuple[tuple[int, int], ...]


def _check_inputs(batch: int, seed: int, sizes: Sizes) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 3, h, w, generator=g) * 2 - 1 for h, w in sizes]


def eager_logits(model: ResNetV2, x: torch.Tensor) -> np.ndarray:
    """The eager model's float32 outputs for x, without autograd: the reference exports are checked against."""
    with torch.no_grad():
        return model(x).float().numpy()


def check_onnx(model: ResNetV2, path: str | os.PathLike, batches: tuple[int, ...] = (1,), seed: int = 0,
               sizes: Sizes = CHECK_SIZES, name: str | os.PathLike | None = None) -> ExportCheck:
    """Run the ONNX file in onnxruntime on random inputs of two sizes per batch and compare with the eager model."""
    name = name or path
    try:
        import onnxruntime as ort
    except ImportError:
        return ExportCheck(False, note="onnxruntime is not installed, so the exported graph could not be run "
                                       "(pip install onnxruntime)")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ExportError(f"{name}: onnxruntime cannot load the exported graph ({type(e).__name__}: {e})") from None
    result = ExportCheck(True)
    model = _reference(model)
    for batch in batches:
        for x in _check_inputs(batch, seed, sizes):
            got = session.run([output_name(model)], {INPUT_NAME: x.numpy()})[0]
            result.rel_errors["x".join(map(str, x.shape))] = rel_error(got, eager_logits(model, x))
    return result


def check_torchscript(model: ResNetV2, path: str | os.PathLike, batch: int = 1, seed: int = 0,
                      sizes: Sizes = CHECK_SIZES, name: str | os.PathLike | None = None) -> ExportCheck:
    """Load the TorchScript file with torch.jit.load and compare it with the eager model at two input sizes."""
    name = name or path
    try:
        with _quiet():
            loaded = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # a corrupt archive raises RuntimeError or a zip error
        raise ExportError(f"{name}: torch.jit.load cannot read the exported file ({type(e).__name__}: {e})") from None
    result = ExportCheck(True)
    model = _reference(model)
    for x in _check_inputs(batch, seed, sizes):
        with torch.no_grad():
            got = loaded(x).float().numpy()
        result.rel_errors["x".join(map(str, x.shape))] = rel_error(got, eager_logits(model, x))
    return result


def onnx_weight_ops(path: str | os.PathLike) -> list[str]:
    """Normalizing ops (ReduceMean, Sqrt, ...) in an ONNX graph whose inputs derive only from constants."""
    import onnx  # only for inspection; exporting itself does not need it

    graph = onnx.load(str(path), load_external_data=False).graph
    constant = {init.name for init in graph.initializer}
    found = []
    for node in graph.node:  # nodes are topologically sorted in a valid ONNX graph
        inputs = [i for i in node.input if i]
        if node.op_type == "Constant" or (inputs and all(i in constant for i in inputs)):
            if node.op_type in NORMALIZING_OPS:
                found.append(f"{node.op_type} {node.name or node.output[0]}")
            constant.update(node.output)
    return found


def export(model: ResNetV2, path: str | os.PathLike, fmt: str, dynamic_batch: bool = True,
           opset: int = DEFAULT_OPSET, rtol: float = DEFAULT_RTOL, sizes: Sizes | None = None) -> ExportCheck:
    """Export `model` to `path` as 'onnx' or 'torchscript', verify it, and only then move it into place.

    ONNX: input 'pixels', output 'logits' ('features' without a head), any batch unless `dynamic_batch=False`,
    metadata_props with the class names and the data config (resolution, scaling). `sizes`: the input sizes
    checked against the eager model (default: the model's resolution and a smaller non-square size).
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if isinstance(rtol, bool) or not isinstance(rtol, int | float) or not (math.isfinite(rtol) and rtol >= 0):
        raise UserError(f"rtol must be a finite number >= 0, got {rtol!r}")
    if fmt == "onnx" and opset not in OPSETS:
        raise ExportError(f"{path}: opset {opset} is not supported; choose {OPSETS.start} to {OPSETS.stop - 1}")
    if model.padding != "fixed":
        raise ExportError(f"{path}: {model.padding!r} padding is computed from each input's size, which a traced "
                          "graph would freeze at the example's size; export supports the authors' fixed padding only")
    check_out_file(path)  # before the work: a directory or unwritable folder is refused by its name
    sizes = sizes or default_check_sizes(model)
    model = _reference(model)
    module = folded_module(model)
    target = Path(path)
    with atomic_path(target) as tmp:
        if fmt == "onnx":
            write_onnx(module, tmp, dynamic_batch=dynamic_batch, opset=opset, name=target,
                       metadata=onnx_metadata(model))
            check = check_onnx(model, tmp, batches=CHECK_BATCHES if dynamic_batch else (1,), sizes=sizes, name=target)
            try:
                leftovers = onnx_weight_ops(tmp)
            except ImportError:
                leftovers = []
            if leftovers:
                raise ExportError(f"{target}: weight standardization was not folded; the graph still computes "
                                  f"{', '.join(leftovers[:5])} on constants")
        else:
            write_torchscript(module, tmp, name=target)
            check = check_torchscript(model, tmp, batch=2, sizes=sizes, name=target)
        if check.checked and not check.max_rel_error <= rtol:
            sizes = ", ".join(f"{k}: {v:.2e}" for k, v in check.rel_errors.items())
            raise ExportError(f"{target}: the exported {fmt} model differs from the eager model (relative error "
                              f"{sizes}; allowed {rtol:g}); nothing was written")
    return check
