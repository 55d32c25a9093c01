"""What runs a model for predict, embed and evaluate: torch (prepare_for_inference), compile (the same, compiled by
torch.compile's inductor with the weights frozen in), or onnxruntime on our export.

onnxruntime is an optional extra (`pip install 'bigtransfer[onnx]'`), imported only when asked for. Its graph is
the same folded export as `bigtransfer export` writes, and it is held to the same standard: on the first batch
its output is compared with the eager fp32 model, and a relative error (max |diff| / max |eager|) above
ORT_RTOL stops the run before any result is used.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..core.errors import UserError
from ..engine.device import pick_device
from ..model.resnetv2 import ResNetV2
from .export import DEFAULT_RTOL, INPUT_NAME, ExportError, eager_logits, folded_module, output_name, rel_error, write_onnx
from .inference_model import InferenceModel, prepare_for_inference

ENGINES = ("torch", "compile", "onnxruntime")
# The export check's tolerance: fp32 throughout, so only summation order differs (measured 1e-6 to 1e-5).
ORT_RTOL = DEFAULT_RTOL
Runner = Callable[[torch.Tensor], torch.Tensor]


def check_engine(engine: str, precision: str = "fp32", device: str = "auto") -> None:
    """Refuse an unknown engine, onnxruntime with a precision or device it does not run here, or compile without the
    compiler torch.compile needs on the device."""
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "compile":
        needed = compilers_needed(pick_device(device).type)
        if needed and not any(map(shutil.which, needed)):
            raise UserError(f"--engine compile on this device builds its kernels with {' or '.join(needed)}, which is "
                            "not on PATH (set CXX/CC, or install one: e.g. apt-get install g++); or use --engine torch")
    if engine == "onnxruntime":
        if precision != "fp32":
            raise UserError(f"--engine onnxruntime runs fp32 only, not {precision}; drop --precision "
                            "or use --engine torch")
        if device not in ("auto", "cpu"):
            raise UserError(f"--engine onnxruntime runs on the CPU here, not on {device}; use --device cpu "
                            "or --engine torch")


def compilers_needed(device_type: str) -> tuple[str, ...]:
    """The compilers torch.compile looks for on this device type, first the one the environment names: inductor's
    CPU code is C++ ($CXX, else g++; clang++ on macOS), Triton's CUDA launchers are C ($CC, else gcc or clang).
    Without one, the first call fails deep inside torch."""
    if device_type == "cpu":
        return (os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++"),)
    if device_type == "cuda":
        return (os.environ["CC"],) if os.environ.get("CC") else ("gcc", "clang")
    return ()


def engine_device(engine: str, precision: str = "fp32", device: str = "auto") -> torch.device:
    """check_engine, then the device the engine's batches go to (onnxruntime: always the CPU)."""
    check_engine(engine, precision, device)
    return pick_device("cpu" if engine == "onnxruntime" else device)


def import_onnxruntime():
    """The onnxruntime module, or a UserError saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("--engine onnxruntime needs the onnxruntime package: pip install 'bigtransfer[onnx]' "
                        "(or use --engine torch)") from None
    return onnxruntime


class OnnxRuntimeRunner:
    """Logits (or pre-logits) from an onnxruntime session on the model's ONNX export, checked on the first batch."""

    def __init__(self, model: ResNetV2, features: bool) -> None:
        ort = import_onnxruntime()
        model = copy.deepcopy(model).float().cpu().eval()
        if features:
            model.reset_head(0)  # the graph's output is then the pooled pre-logits
        self.output = output_name(model)
        self.checked: float | None = None  # the first batch's relative error, once checked
        self._reference: ResNetV2 | None = model
        with tempfile.TemporaryDirectory(prefix="bigtransfer-ort-") as folder:
            path = Path(folder) / "model.onnx"
            write_onnx(folded_module(model), path, name="the onnxruntime engine's export")
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            # The session reads the file while it is built, so the temporary file can go right after.
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().cpu().contiguous()
        got = self.session.run([self.output], {INPUT_NAME: x.numpy()})[0]
        if self._reference is not None:
            # The same measure as the export's own check (bigtransfer.deploy.export.check_onnx).
            err = rel_error(got, eager_logits(self._reference, x))
            if not err <= ORT_RTOL:
                raise ExportError(f"onnxruntime's output differs from the eager model on the first batch (relative "
                                  f"error {err:.2e}, allowed {ORT_RTOL:g}); nothing was computed with it: "
                                  "use --engine torch")
            self.checked, self._reference = err, None
        return torch.from_numpy(got)


def runner(model: ResNetV2, engine: str, precision: str, features: bool) -> Runner:
    """A callable giving logits (or, with `features`, pre-logits) of a batch on the model's device, float32."""
    if engine == "onnxruntime":
        return OnnxRuntimeRunner(model, features)
    fast = _compiled(model, precision) if engine == "compile" else prepare_for_inference(model, precision=precision)
    return fast.forward_features if features else fast


# The last compiled model, for the next call on the same model: evaluate embeds its two splits in two calls, a
# script may call predict in a loop, and every new InferenceModel would compile again (about a minute on a CPU).
_LAST_COMPILED: list[tuple[ResNetV2, str, InferenceModel]] = []


def _compiled(model: ResNetV2, precision: str) -> InferenceModel:
    if _LAST_COMPILED and _LAST_COMPILED[0][0] is model and _LAST_COMPILED[0][1] == precision:
        return _LAST_COMPILED[0][2]
    fast = prepare_for_inference(model, precision=precision, compile=True)
    _LAST_COMPILED[:] = [(model, precision, fast)]
    return fast
