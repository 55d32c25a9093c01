"""Export a BiT model to ONNX or TorchScript with weight standardization folded into plain convs, then verify it."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .atomic import atomic_path
from .checks import check_out_file
from .errors import UserError
from .fast import prepare_for_inference
from .models import ResNetV2

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


def write_onnx(module: nn.Module, path: str | os.PathLike, dynamic_batch: bool = False,
               opset: int = DEFAULT_OPSET, name: str | os.PathLike | None = None) -> None:
    """Write `module` as an ONNX graph with dynamic height and width (and batch, if asked) to `path`.

    `name`: the file to name in error messages (the final path when `path` is a temporary one).
    """
    name = name or path
    if opset not in OPSETS:
        raise ExportError(f"{name}: opset {opset} is not supported; choose {OPSETS.start} to {OPSETS.stop - 1}")
    if _param_bytes(module) >= _PROTOBUF_LIMIT:
        raise ExportError(f"{name}: the weights ({_param_bytes(module) / 1024**3:.1f} GiB) exceed ONNX's 2 GiB "
                          "single-file limit; export --format torchscript instead")
    axes = {"image": {2: "height", 3: "width"}, "logits": {}}
    if dynamic_batch:
        axes["image"][0] = "batch"
        axes["logits"][0] = "batch"
    example = torch.zeros(1, 3, 64, 64)
    try:
        with _quiet():
            # The TorchScript-based exporter: the torch.export-based one needs onnxscript, not a dependency here.
            torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=["image"],
                              output_names=["logits"], dynamic_axes=axes, opset_version=opset, do_constant_folding=True)
    except Exception as e:  # the exporter raises many types (RuntimeError, SymbolicValueError, ...)
        raise ExportError(f"{name}: ONNX export failed at opset {opset} ({type(e).__name__}: {e})") from None


def write_torchscript(module: nn.Module, path: str | os.PathLike, name: str | os.PathLike | None = None) -> None:
    """Write `module` as a traced TorchScript file; the trace holds no input shape, so any H and W work."""
    name = name or path
    try:
        with _quiet():
            traced = torch.jit.trace(module, torch.zeros(1, 3, 64, 64), check_trace=False)
            traced.save(str(path))
    except Exception as e:  # tracing failures come as RuntimeError or TracingCheckError
        raise ExportError(f"{name}: TorchScript export failed ({type(e).__name__}: {e})") from None


def _rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))


Sizes = tuple[tuple[int, int], ...]


def _check_inputs(batch: int, seed: int, sizes: Sizes) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 3, h, w, generator=g) * 2 - 1 for h, w in sizes]


def _eager(model: ResNetV2, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).float().numpy()


def check_onnx(model: ResNetV2, path: str | os.PathLike, batch: int = 1, seed: int = 0,
               sizes: Sizes = CHECK_SIZES, name: str | os.PathLike | None = None) -> ExportCheck:
    """Run the ONNX file in onnxruntime on random inputs of two sizes and compare with the eager model."""
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
    for x in _check_inputs(batch, seed, sizes):
        got = session.run(["logits"], {"image": x.numpy()})[0]
        result.rel_errors["x".join(map(str, x.shape))] = _rel_error(got, _eager(model, x))
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
        result.rel_errors["x".join(map(str, x.shape))] = _rel_error(got, _eager(model, x))
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


def export(model: ResNetV2, path: str | os.PathLike, fmt: str, dynamic_batch: bool = False,
           opset: int = DEFAULT_OPSET, rtol: float = DEFAULT_RTOL, sizes: Sizes = CHECK_SIZES) -> ExportCheck:
    """Export `model` to `path` as 'onnx' or 'torchscript', verify it, and only then move it into place."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if isinstance(rtol, bool) or not isinstance(rtol, int | float) or not (math.isfinite(rtol) and rtol >= 0):
        raise UserError(f"rtol must be a finite number >= 0, got {rtol!r}")
    if fmt == "onnx" and opset not in OPSETS:
        raise ExportError(f"{path}: opset {opset} is not supported; choose {OPSETS.start} to {OPSETS.stop - 1}")
    check_out_file(path)  # before the work: a directory or unwritable folder is refused by its name
    model = _reference(model)
    module = folded_module(model)
    target = Path(path)
    with atomic_path(target) as tmp:
        if fmt == "onnx":
            write_onnx(module, tmp, dynamic_batch=dynamic_batch, opset=opset, name=target)
            check = check_onnx(model, tmp, batch=2 if dynamic_batch else 1, sizes=sizes, name=target)
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
