"""Inference fast path: a frozen copy of a BiT model with weights standardized once."""

from __future__ import annotations

import copy
import os
import threading
import warnings

import torch
from torch import nn

from ..engine.device import PRECISIONS, check_precision
from ..model import kernelcal
from ..model.gemmconv import recording_convs
from ..model.normlayout import recording_norms
from ..model.resnetv2 import PlainConv2d, ResNetV2, StdConv2d


def _layout(model: nn.Module) -> tuple:
    """Names, shapes, dtypes and devices of the parameters: what a frozen copy must share to be refilled in place."""
    return tuple((name, tuple(p.shape), p.dtype, p.device) for name, p in model.named_parameters())


def _signature(model: nn.Module) -> tuple:
    """Changes whenever a parameter is updated in place (version counter) or replaced (a new tensor or storage:
    also what a change of shape, dtype, device or layout makes)."""
    return tuple((id(p), p._version, p.data_ptr()) for p in model.parameters())


def _standardized_state(model: ResNetV2) -> dict[str, torch.Tensor]:
    """The model's state with every standardized conv's kernel replaced by its standardized value."""
    with torch.no_grad():
        state = dict(model.state_dict())
        for name, m in model.named_modules():
            if isinstance(m, StdConv2d):
                state[f"{name}.weight"] = m.standardized_weight()
    return state


def _plain_conv(m: StdConv2d) -> PlainConv2d:
    plain = PlainConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                        bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
    plain.dynamic_same = m.dynamic_same
    return plain


def frozen_copy(model: ResNetV2) -> ResNetV2:
    """A copy of `model` whose standardized convs are plain convs holding the standardized kernels."""
    frozen = copy.deepcopy(model)
    for name, m in list(frozen.named_modules()):
        if isinstance(m, StdConv2d):
            parent, _, child = name.rpartition(".")
            setattr(frozen.get_submodule(parent) if parent else frozen, child, _plain_conv(m))
    frozen.load_state_dict(_standardized_state(model))
    return frozen.eval().requires_grad_(False)


# CPU instruction sets that give each reduced precision real matrix units. oneDNN also runs bf16 on plain
# AVX512 (it reports it "supported"), but emulated, and measured 2-3x slower than fp32 (benchmarks/RESULTS.md).
_CPU_UNITS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


def native_precision(precision: str, device: torch.device) -> bool:
    """Whether `precision` runs on hardware matrix units on `device` rather than emulated (fp32 always does)."""
    if precision == "fp32":
        return True
    if device.type == "cuda":
        return precision == "fp16" or torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return any(flag in flags for flag in _CPU_UNITS[precision])


# Several threads' first calls of one shape: one calibrates (the first shape may switch the copy's layout), the others
# wait for its plan rather than run on a copy being changed or time the kernels again. Module-level: calibration is
# rare, and an InferenceModel stays deep-copyable.
_CALIBRATION = threading.Lock()


def _new_calibration_lock() -> None:
    # A child forked while another thread calibrates would inherit the lock held by a thread it does not have, and
    # its first call of a new shape would wait forever (DataLoader workers and multiprocessing fork on Linux).
    global _CALIBRATION
    _CALIBRATION = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX only; Windows has no fork
    os.register_at_fork(after_in_child=_new_calibration_lock)


def _frozen_compile(fn):
    """torch.compile with inductor's freezing: weights become constants, prepacked for oneDNN, with the
    residual add fused into the conv. A weight change therefore needs a new compile (refresh() drops it)."""
    compiled = torch.compile(fn, dynamic=False)

    def call(x: torch.Tensor) -> torch.Tensor:
        # Freezing is read when a graph is (re)compiled, which happens inside a call; passing it through
        # torch.compile(options=...) was measured to leave it off.
        from torch._inductor import config

        with config.patch(freezing=True):
            return compiled(x)

    return call


class InferenceModel(nn.Module):
    """Eval-only BiT model: float32 NCHW input in [-1, 1] -> float32 logits, no autograd.

    Holds a frozen copy of the source model with the standardized kernels computed once, in the chosen
    precision and memory layout. Before each call it checks the source's parameters (version counters and
    storage) and recomputes the copy if they changed, e.g. after an optimizer step or load_state_dict.
    Call `refresh()` after changing weights behind autograd's back (through `.data`). On a CPU the first call
    of each input shape times the kernels (see `prepare_for_inference`'s calibrate).
    """

    def __init__(self, model: ResNetV2, precision: str = "fp32", channels_last: bool | None = None,
                 compile: bool = False, calibrate: bool | None = None) -> None:
        super().__init__()
        if not isinstance(model, ResNetV2):
            raise TypeError(f"prepare_for_inference needs a bigtransfer ResNetV2, not {type(model).__name__}")
        check_precision(precision)
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        # Channels-last: oneDNN's convolutions and max-pool measured 1.3-2x faster than NCHW on this model
        # (benchmarks/RESULTS.md), and it is cuDNN's tensor-core layout.
        # None on a CPU in fp32: the first call's calibration (bigtransfer.model.kernelcal) may switch to NCHW.
        self.channels_last = True if channels_last is None else bool(channels_last)
        self._auto_layout = channels_last is None
        self.compile = compile
        self.calibrate = kernelcal.enabled() if calibrate is None else bool(calibrate)
        # Input shape -> the calibrated GEMM choice per convolution shape and the GroupNorm shapes that run through
        # an NCHW copy (see _kernel_choices).
        self._plans: dict[tuple[int, ...], kernelcal.KernelPlan] = {}
        # Kept outside the module tree so state_dict() and parameters() don't repeat the source's weights.
        self.__dict__["source"] = model
        self.frozen: ResNetV2 = None  # type: ignore[assignment]  # set by refresh()
        self._compiled: dict[bool, object] = {}
        self._compiled_batches: dict[tuple[int, ...], set[int]] = {}  # image shape -> batch sizes compiled for it
        self._sig: tuple = ()
        self.refresh()
        super().eval()

    @property
    def labels(self) -> list[str] | None:
        return self.source.labels

    @property
    def data_config(self) -> dict | None:
        return self.source.data_config

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def feature_dim(self) -> int:
        return self.source.feature_dim

    def train(self, mode: bool = True) -> InferenceModel:
        """Inference only: training mode is refused."""
        if mode:
            raise RuntimeError("an InferenceModel is eval-only; train the source model instead")
        return super().train(False)

    def refresh(self) -> None:
        """Recompute the frozen copy from the source model's current weights."""
        source = self.source
        # Same shapes and devices: refill in place. Not when compiling: a frozen graph holds the old weights as
        # constants and its cache entry is guarded on the module object, so only a new copy recompiles.
        if self.frozen is not None and _layout(source) == self._layout and not self.compile:
            self.frozen.load_state_dict(_standardized_state(source))
        else:
            frozen = frozen_copy(source)
            self._layout = _layout(source)
            if self.dtype is not torch.float32 and not self._autocast:
                frozen = frozen.to(self.dtype)
            if self.channels_last:
                frozen = frozen.to(memory_format=torch.channels_last)
            self.frozen = frozen
        self._compiled = {}
        self._sig = _signature(source)

    @property
    def _autocast(self) -> bool:
        # On CUDA: autocast, the standard mixed-precision recipe (GroupNorm in fp32). On CPU a copy cast once
        # to the reduced precision measured slightly faster than autocast (no per-call weight casts) with the
        # same top-1 agreement (CPU GroupNorm accumulates bf16 input in fp32).
        return self.dtype is not torch.float32 and next(self.source.parameters()).device.type != "cpu"

    def _function(self, features: bool):
        if _signature(self.source) != self._sig:
            self.refresh()
        fn = self.frozen.forward_features if features else self.frozen.forward
        if not self.compile:
            return fn
        if features not in self._compiled:
            self._compiled[features] = _frozen_compile(fn)
        return self._compiled[features]

    @property
    def _calibrates(self) -> bool:
        # Kernels are timed for eager runs on a CPU (a compiled graph runs inductor's kernels, not this dispatch):
        # convolutions in fp32 (the GEMM path and the layout), GroupNorms on channels-last maps in any precision.
        return (self.calibrate and not self.compile and next(self.source.parameters()).device.type == "cpu"
                and (self.dtype is torch.float32 or self.channels_last))

    def _kernel_choices(self, x: torch.Tensor, fn) -> kernelcal.KernelPlan:
        """The calibrated kernels for inputs shaped like `x` (measured on the first call of the shape): per
        convolution shape, GEMM or oneDNN (fp32, where the GEMM path exists), and the GroupNorm shapes faster
        through an NCHW copy."""
        shape = tuple(x.shape)
        if shape in self._plans:
            return self._plans[shape]
        with _CALIBRATION:
            if shape not in self._plans:
                self._plans[shape] = self._calibrate(x, fn)
        return self._plans[shape]

    def _calibrate(self, x: torch.Tensor, fn) -> kernelcal.KernelPlan:
        """One forward pass records the shapes, kernelcal times those not cached yet, and the choices follow. The
        first shape also picks the layout (fp32), once only, since a refill keeps the copy's layout."""
        with torch.no_grad(), recording_convs() as convs, recording_norms() as norms:
            self._call(fn, self._layout_input(x))
        gemm = None
        if self.dtype is torch.float32:
            layouts = (True, False) if self._auto_layout and not self._plans else (self.channels_last,)
            plan = kernelcal.plan(convs, layouts)
            if plan.channels_last != self.channels_last:
                self.channels_last = plan.channels_last
                self.frozen.to(memory_format=torch.channels_last if plan.channels_last else torch.contiguous_format)
            gemm = plan.gemm
        nchw = kernelcal.norm_plan(norms, self.dtype) if self.channels_last and norms else frozenset()
        return gemm, nchw

    def _layout_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def _call(self, fn, x: torch.Tensor) -> torch.Tensor:
        """`fn(x)` in the copy's precision: on the cast copy, or under autocast (CUDA)."""
        if self.dtype is torch.float32:
            return fn(x)
        if self._autocast:
            with torch.autocast(x.device.type, dtype=self.dtype):
                return fn(x)
        return fn(x.to(self.dtype))

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """Compiled: a batch padded with blank images to the smallest batch size already compiled for its image size
        that holds it (a folder's last batch), so that a graph serves it instead of a new compile (30-60 s on a CPU);
        only a batch larger than every compiled one compiles. Each image's result is its own: GroupNorm has no
        statistics across the batch. Kept across refresh(): the sizes, not the graphs."""
        n = x.shape[0]
        sizes = self._compiled_batches.setdefault(tuple(x.shape[1:]), set())
        full = min((size for size in sizes if size >= n), default=n)
        sizes.add(full)
        return torch.cat([x, x.new_zeros(full - n, *x.shape[1:])]) if n < full else x

    def _run(self, x: torch.Tensor, features: bool) -> torch.Tensor:
        fn = self._function(features)
        kernels = self._kernel_choices(x, fn) if self._calibrates and x.dim() == 4 else kernelcal.RULE
        batch = self._padded(x) if self.compile and x.dim() == 4 else x
        with torch.no_grad(), kernelcal.in_force(kernels):
            return self._call(fn, self._layout_input(batch))[:len(x)].float()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logits (N, 2048*w), float32."""
        return self._run(x, features=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, classes), float32."""
        return self._run(x, features=False)


def prepare_for_inference(model: ResNetV2, precision: str = "fp32", channels_last: bool | None = None,
                          compile: bool = False, calibrate: bool | None = None) -> InferenceModel:
    """A fast eval-only module computing the same logits and features as `model` (float32 in, float32 out).

    precision: "fp32" (within 1e-4 relative of the model), "bf16" or "fp16" (reduced-precision compute).
    channels_last: memory layout of the frozen copy; None picks the faster one: on a CPU in fp32, by timing the
    model's convolution shapes on the first call of each input shape (bigtransfer.model.kernelcal, cached on disk;
    BIGTRANSFER_CALIBRATE=0 turns it off), elsewhere channels-last.
    calibrate: whether to time kernels on a CPU, on the first call of each input shape: in fp32 each convolution
    shape (layout, GEMM or oneDNN; see channels_last), and in any precision each GroupNorm shape on channels-last
    maps (its own kernel or through an NCHW copy: bigtransfer.model.normlayout); None: unless
    BIGTRANSFER_CALIBRATE=0. False gives results that depend on the shapes only (GEMM_MAX_POSITIONS), never on
    timings.
    compile: also torch.compile the frozen copy (inductor, weights frozen in as constants): the first call of each
    image size and batch size compiles (30-60 s for R50x1 on a 2-core CPU; a C++ compiler is needed there), a
    batch no larger than one already compiled runs padded to it, and a weight change recompiles.
    """
    fast = InferenceModel(model, precision, channels_last, compile, calibrate)
    device = next(model.parameters()).device
    if not native_precision(precision, device):
        warnings.warn(f"{precision} on this {device.type} has no matrix-unit support and is emulated: "
                      "expect it to be slower than fp32", RuntimeWarning, stacklevel=2)
    return fast
