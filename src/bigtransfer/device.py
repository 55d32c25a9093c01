"""Where and in what precision to run: device choice, autocast dtype and the fp16 gradient scaler."""

from __future__ import annotations

import contextlib

import torch

# Training precisions: the autocast dtype each one runs the forward pass in (None = plain float32).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(name: str = "auto") -> torch.device:
    """The torch device for `name`: 'auto' picks cuda, then mps, then cpu; others are checked to exist."""
    name = (name or "auto").lower()
    kind = name.split(":", 1)[0]
    if kind not in DEVICES:
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)} (or cuda:N)")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but this torch build sees no CUDA GPU")
    if kind == "mps" and not _mps_available():
        raise RuntimeError("device 'mps' requested but Apple's Metal backend is not available here")
    return torch.device(name)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype autocast runs in for a precision name ('fp32' -> None: no autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


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
    # path of bigtransfer.gemmconv); it is cuDNN's tensor-core layout. MPS support for it is patchy.
    return torch.channels_last if channels_last and device.type in ("cpu", "cuda") else torch.contiguous_format


def describe(device: torch.device) -> str:
    """A short human description of a device, e.g. 'cuda (NVIDIA H100)' or 'cpu (2 threads)'."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device.type
