"""Where and in what precision to run: device choice, autocast dtype and the fp16 gradient scaler."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..core.errors import SetupError, UserError
from .precision import PRECISION_DTYPES, check_precision

# The precision table (engine/precision.py) with the dtypes themselves.
PRECISIONS: dict[str, torch.dtype] = {name: getattr(torch, dtype) for name, dtype in PRECISION_DTYPES.items()}
DEVICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(name: str = "auto") -> torch.device:
    """The torch device for `name`: 'auto' picks cuda, then mps, then cpu; others are checked to exist."""
    name = (name or "auto").lower()
    kind = name.split(":", 1)[0]
    if kind not in DEVICES:
        raise UserError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)} (or cuda:N)")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise SetupError(f"device {name!r} requested but this torch build sees no CUDA GPU")
    if kind == "mps" and not _mps_available():
        raise SetupError("device 'mps' requested but Apple's Metal backend is not available here")
    return torch.device(name)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype autocast runs in for a precision name ('fp32' -> None: no autocast)."""
    check_precision(precision)
    return None if precision == "fp32" else PRECISIONS[precision]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """A context that runs the forward pass in `precision` on `device` (a no-op for fp32)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 (whose small gradients would underflow), else None."""
    if autocast_dtype(precision) is not torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def training_layout(device: torch.device, channels_last: bool) -> torch.memory_format:
    """The memory format to train in: channels-last where asked for and the device's kernels favour it."""
    # Measured on CPU (benchmarks/RESULTS.md: oneDNN convolutions 1.2-2.3x faster, and it enables the GEMM
    # path of bigtransfer.model.gemmconv); it is cuDNN's tensor-core layout. MPS support for it is patchy.
    return torch.channels_last if channels_last and device.type in ("cpu", "cuda") else torch.contiguous_format


def sgd(params: Any, device: torch.device, fused: bool = True, **kwargs: Any) -> torch.optim.SGD:
    """Momentum SGD over `params`, with PyTorch's fused update on CPU and CUDA (same values, fewer memory passes)."""
    # Measured on R50x1 on CPU: 30 ms per update fused against 37 ms for the default multi-tensor update, with
    # bit-identical weights after five updates. FSDP's sharded (DTensor) parameters have no fused kernel.
    return torch.optim.SGD(params, fused=(fused and device.type in ("cpu", "cuda")) or None, **kwargs)


def with_own_update_kernel(saved: dict, optimizer: Any) -> dict:
    """A saved optimizer state carrying `optimizer`'s own fused/foreach choice instead of the saving run's.

    Which update kernel runs depends on the device and on sharding (FSDP has no fused one), not on the run, and
    Optimizer.load_state_dict would otherwise copy the saving process's choice over this one's.
    """
    groups = getattr(optimizer, "param_groups", None)
    if not groups or not saved.get("param_groups"):
        return saved
    mine = [{k: v for k, v in g.items() if k in ("fused", "foreach")} for g in groups]
    return {**saved, "param_groups": [{**g, **m} for g, m in zip(saved["param_groups"], mine, strict=True)]}


def align_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor (momentum) its parameter's memory layout, after a load."""
    # A state saved from (or into) another layout comes back contiguous; the fused update walks parameter,
    # gradient and momentum storage in lockstep, so a channels-last parameter with an NCHW momentum buffer would
    # be updated with scrambled momentum (measured: 1.3e-3 relative weight error after one resumed update).
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, t in optimizer.state.get(p, {}).items():
                if isinstance(t, torch.Tensor) and t.shape == p.shape and t.stride() != p.stride():
                    optimizer.state[p][key] = torch.empty_like(p, dtype=t.dtype).copy_(t)


def describe(device: torch.device) -> str:
    """A short human description of a device, e.g. 'cuda (NVIDIA H100)' or 'cpu (2 threads)'."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device.type
