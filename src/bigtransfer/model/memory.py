"""Up-front memory estimates, so that a run far too large for the machine is refused instead of hanging.

The estimates are lower bounds, from the architecture alone (nothing is allocated):
- parameters: exact count of every conv kernel, GroupNorm scale/offset and the head;
- training: 16 bytes per parameter (float32 weights, gradients, momentum, standardized kernels) plus the
  activations kept for backward per image times the micro-batch. Per unit of input resolution P_in and output
  resolution P_out those are 2 cin P_in + 2 cmid P_in + 2 cmid P_out floats (GroupNorm inputs and ReLU outputs
  that the convs keep), plus the root's input and conv output (with the max-pool's indices) and the final
  GroupNorm. Measured against the tensors autograd really saves (R14x0.5 to R50x1, 64-128 px): 6-15% above;
  peak use is higher still (transients, the allocator, the data loader), so refusing above the machine's memory
  never refuses a run that would fit. With gradient checkpointing only each unit's input is kept, plus one unit's
  recomputation;
- inference: 4 bytes per parameter plus three of the largest feature maps per image (input, output, shortcut).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..core.errors import UserError

GIB = 1024**3


@dataclass(frozen=True)
class _Shape:
    """Per-image float counts of one architecture at one resolution."""

    params: int
    saved: int  # activations kept for backward by a plain training step
    saved_checkpointed: int  # the same with per-unit gradient checkpointing
    largest_map: int


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def _shape(arch, num_classes: int, resolution: int) -> _Shape:
    w, root = arch.width, arch.root_channels
    params = 3 * 49 * root
    h = _conv_out(resolution, 7, 2, 3)
    root_floats = 3 * resolution**2 + 3 * root * h * h  # input, conv output, max-pool indices (int64)
    largest = max(3 * resolution**2, root * h * h)
    h = _conv_out(h + 2, 3, 2, 0)
    saved, inputs, widest_unit, cin = 0, 0, 0, root
    for i, n_units in enumerate(arch.units):
        cmid = int(64 * w * 2**i)
        cout = 4 * cmid
        for j in range(n_units):
            stride = 1 if (i == 0 or j > 0) else 2
            hout = _conv_out(h, 3, stride, 1)
            params += cin * cmid + 9 * cmid * cmid + cmid * cout + 2 * (cin + 2 * cmid)
            if stride != 1 or cin != cout:
                params += cin * cout
            unit = 2 * cin * h * h + 2 * cmid * h * h + 2 * cmid * hout * hout
            saved += unit
            inputs += cin * h * h
            widest_unit = max(widest_unit, unit)
            largest = max(largest, cin * h * h, cout * hout * hout)
            cin, h = cout, hout
    params += 2 * cin + (cin * num_classes + num_classes)
    tail = 2 * cin * h * h
    return _Shape(params, root_floats + saved + tail, root_floats + inputs + widest_unit + tail, largest)


def parameter_count(arch, num_classes: int) -> int:
    """Parameters of a ResNetV2 of `arch` with a `num_classes` head (0: none), without building it."""
    return _shape(arch, num_classes, 32).params


def training_bytes(arch, num_classes: int, resolution: int, micro_batch: int, checkpointing: bool = False,
                   precision: str = "fp32", shards: int = 1) -> int:
    """Lower bound of the memory a training step takes (see the module's docstring).

    precision: bf16/fp16 autocast keeps activations in 2 bytes; shards: processes FSDP splits the weights over.
    """
    s = _shape(arch, num_classes, resolution)
    per_image = s.saved_checkpointed if checkpointing else s.saved
    return 16 * s.params // shards + (4 if precision == "fp32" else 2) * per_image * micro_batch


def inference_bytes(arch, num_classes: int, resolution: int, batch: int) -> int:
    """Lower bound of the memory a float32 forward pass without autograd takes."""
    s = _shape(arch, num_classes, resolution)
    return 4 * s.params + 4 * 3 * s.largest_map * batch


def machine_memory(device: torch.device | None = None) -> int | None:
    """Bytes of memory on `device`: a GPU's own memory, else RAM (capped by a cgroup limit); None if unknown."""
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    sizes = []
    try:
        sizes.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    try:  # a container's limit (cgroup v2), when it has one
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            sizes.append(int(limit))
    except OSError:
        pass
    return min(sizes) if sizes else None


def check_fits(need: int, what: str, fix: str, device: torch.device | None = None) -> None:
    """Refuse `what` when its estimated memory `need` exceeds the device's; the message gives both numbers."""
    have = machine_memory(device)
    if have is not None and need > have:
        where = f"this GPU has {have / GIB:.1f} GiB" if device is not None and device.type == "cuda" else \
            f"this machine has {have / GIB:.1f} GiB of RAM"
        raise UserError(f"{what} needs at least {need / GIB:,.1f} GiB of memory (a lower-bound estimate), but {where}; "
                        f"{fix}")


def check_training(arch, num_classes: int, resolution: int, micro_batch: int, *, what: str,
                   checkpointing: bool = False, precision: str = "fp32", shards: int = 1,
                   device: torch.device | None = None) -> None:
    """Refuse a training run that cannot fit: first the model alone (weights, gradients, momentum), then the step."""
    params = parameter_count(arch, num_classes)
    check_fits(16 * params // shards, f"training {arch.name} ({params:,} parameters)", "choose a smaller model",
               device)
    check_fits(training_bytes(arch, num_classes, resolution, micro_batch, checkpointing, precision, shards),
               f"{what} on {resolution}x{resolution} px in micro-batches of {micro_batch}",
               "lower --batch or --resolution, raise --batch-split, or use --grad-checkpointing", device)
