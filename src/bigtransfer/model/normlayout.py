"""GroupNorm on channels-last maps through an NCHW copy, for the shapes where that is faster on the machine at hand.

PyTorch's CPU GroupNorm has its own kernel for channels-last maps. Its speed against the NCHW kernel depends on the
shape, the dtype and the CPU: on a 2-core Sapphire Rapids Xeon, in bf16, R50x1's 128- and 256-channel maps at 28x28
and 14x14 (4 and 8 channels per group) ran 1.8-3.5x faster through an NCHW copy, copies included, and every other
shape slower; in fp32 the channels-last kernel won everywhere (`benchmarks/bench_norm_layout.py`, RESULTS.md). So
the inference path (`deploy.inference_model`) and the training loops (`kernelcal.TrainingKernels`) time both per
shape (`model.kernelcal.norm_plan`) and run a GroupNorm through an NCHW copy where that measured clearly faster;
the choices are in force inside `norm_layouts()`. Outside, a `LayoutGroupNorm` is exactly `nn.GroupNorm`; every
GroupNorm of a bigtransfer ResNetV2 is one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.scoped import scoped

# A GroupNorm call as the dispatch sees it: (batch, channels, height, width, groups).
NormKey = tuple[int, int, int, int, int]

_NCHW: ContextVar[frozenset[NormKey]] = ContextVar("nchw_norms", default=frozenset())
_SEEN: ContextVar[list[NormKey] | None] = ContextVar("seen_norms", default=None)


def channels_last_map(x: torch.Tensor) -> bool:
    """A 4-d map stored channels-last (and not also contiguous, as 1x1 maps are both)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def group_norm_via_nchw(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                        eps: float) -> torch.Tensor:
    """F.group_norm of a channels-last map computed on an NCHW copy, returned channels-last."""
    return F.group_norm(x.contiguous(), groups, weight, bias, eps).contiguous(memory_format=torch.channels_last)


@contextlib.contextmanager
def norm_layouts(nchw: frozenset[NormKey]) -> Iterator[None]:
    """Inside: a LayoutGroupNorm of a channels-last map whose key is in `nchw` runs through an NCHW copy."""
    with scoped(_NCHW, nchw):
        yield


@contextlib.contextmanager
def recording_norms() -> Iterator[list[NormKey]]:
    """Inside: every LayoutGroupNorm of a channels-last map appends its key to the yielded list."""
    with scoped(_SEEN, []) as seen:
        yield seen


class LayoutGroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and state dict) that follows `norm_layouts()` on channels-last maps, or with
    `always_nchw` set runs every channels-last map through an NCHW copy (for precision, on any device)."""

    always_nchw = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A compiled graph (inductor) brings its own GroupNorm code: no dispatch to trace there.
        if torch.compiler.is_compiling():
            return super().forward(x)
        if self.always_nchw and channels_last_map(x):
            return group_norm_via_nchw(x, self.num_groups, self.weight, self.bias, self.eps)
        nchw, seen = _NCHW.get(), _SEEN.get()
        # Nothing chosen and nothing recorded (the usual case: fp32 here, every GPU run) costs two lookups. Choices
        # are CPU timings: a run measured on a CPU and resumed on a GPU keeps cuDNN's GroupNorm.
        if (not nchw and seen is None) or x.device.type != "cpu" or not channels_last_map(x):
            return super().forward(x)
        key: NormKey = (*x.shape, self.num_groups)  # type: ignore[assignment]
        if seen is not None:
            seen.append(key)
        if key in nchw:
            return group_norm_via_nchw(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)
