"""Convolution as one matrix product on channels-last maps, for the layers where that beats oneDNN's kernels."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar

import torch
import torch.nn.functional as F

from ..core.scoped import scoped

# A convolution as the dispatch sees it: (batch, in channels, height, width, out channels, kernel, stride, padding).
ConvKey = tuple[int, int, int, int, int, int, int, int]


def _out_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def _patches(x: torch.Tensor, k: int, stride: int, pad: int) -> torch.Tensor:
    """The (N*Ho*Wo, k*k*C) patch matrix of a channels-last map, rows in (n, y, x), columns in (ky, kx, c)."""
    n, c, h, w = x.shape
    nhwc = x.permute(0, 2, 3, 1)
    if pad:
        nhwc = F.pad(nhwc, (0, 0, pad, pad, pad, pad))
    ho, wo = _out_size(h, k, stride, pad), _out_size(w, k, stride, pad)
    s = nhwc.stride()
    view = nhwc.as_strided((n, ho, wo, k, k, c), (s[0], s[1] * stride, s[2] * stride, s[1], s[2], s[3]))
    return view.reshape(n * ho * wo, k * k * c)


def _channels_last_matmul(a: torch.Tensor, b: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """a @ b written straight into a channels-last (N, C, H, W) tensor of `shape` (rows = (n, y, x))."""
    n, c, h, w = shape
    out = torch.empty(shape, dtype=a.dtype, device=a.device, memory_format=torch.channels_last)
    torch.mm(a, b, out=out.permute(0, 2, 3, 1).view(n * h * w, c))
    return out


class _GemmConv(torch.autograd.Function):
    """Convolution through a patch matrix; backward recomputes the patches instead of keeping them.

    Outputs and input gradients are fresh channels-last tensors, not views of the products: an in-place op on a
    view (the unit's residual add) would make autograd rebuild the whole base tensor in backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, wk: torch.Tensor, k: int, stride: int, pad: int) -> torch.Tensor:
        n, _, h, w = x.shape
        ho, wo = _out_size(h, k, stride, pad), _out_size(w, k, stride, pad)
        y = _channels_last_matmul(_patches(x, k, stride, pad), wk.t(), (n, wk.shape[0], ho, wo))
        # The conv input is also what the preceding ReLU keeps for its own backward, so saving it is free.
        ctx.save_for_backward(x, wk)
        ctx.geometry = (k, stride, pad)
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, wk = ctx.saved_tensors
        k, stride, pad = ctx.geometry
        n, c, h, w = x.shape
        ho, wo = gy.shape[2], gy.shape[3]
        g = gy.permute(0, 2, 3, 1).reshape(n * ho * wo, -1)
        gx = gw = None
        if ctx.needs_input_grad[1]:
            # (out, k*k*in), the channels-last kernel's own layout: no transposing copy on the way to .grad.
            gw = g.t() @ _patches(x, k, stride, pad)
        if ctx.needs_input_grad[0]:
            if k == 1 and stride == 1:
                return _channels_last_matmul(g, wk, (n, c, h, w)), gw, None, None, None
            gcols = (g @ wk).view(n, ho, wo, k, k, c)
            gpad = x.new_zeros(n, h + 2 * pad, w + 2 * pad, c)
            # Scatter-add each kernel tap's share back onto the (padded) input positions it read.
            for i in range(k):
                for j in range(k):
                    gpad[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride] += gcols[:, :, :, i, j]
            gx = gpad[:, pad:pad + h, pad:pad + w].permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        return gx, gw, None, None, None


def gemm_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, padding: int = 0) -> torch.Tensor:
    """F.conv2d(x, weight, stride=stride, padding=padding) for square kernels, no groups or bias, as a matmul."""
    cout, cin, k, _ = weight.shape
    # Rows (out), columns (ky, kx, in) to match the patch matrix: a view of a channels-last kernel, whose
    # gradient the backward hands back in that same layout, without a transposing copy.
    wk = weight.permute(0, 2, 3, 1).reshape(cout, k * k * cin)
    return _GemmConv.apply(x.contiguous(memory_format=torch.channels_last), wk, k, stride, padding)


# (kernel size, stride, with backward) -> the largest output map, in positions per image, that goes to the
# matrix product. Measured on R50x1's shapes on a 2-core AVX-512 CPU (benchmarks/RESULTS.md), layer by layer
# and then whole-model: 1x1 convolutions ran 1.1-2.1x faster as one GEMM at 16x16 and below and lost at 32x32;
# 3x3 ones won 1.7-1.9x at 4x4 (stride 2: down to 7x7) and lost 0.7-0.9x forward-only at 7x7-14x14 stride 1,
# but whole training steps ran 5-8% faster with the 8x8 stride-1 3x3s as GEMMs too (oneDNN's backward of those
# is slow). Everything else, and every larger map, stays with oneDNN's convolution. Empty it to turn GEMMs off.
GEMM_MAX_POSITIONS: dict[tuple[int, int, bool], int] = {
    (1, 1, False): 256, (1, 2, False): 256, (3, 1, False): 16, (3, 2, False): 49,
    (1, 1, True): 256, (1, 2, True): 256, (3, 1, True): 64, (3, 2, True): 49,
}


# Per-shape choices measured on this machine (bigtransfer.model.kernelcal), in force inside kernel_choices(): one
# set for forward-only calls, one for calls a backward follows (training); context variables, so concurrent
# threads running different models don't see each other's choices.
_CHOICES: ContextVar[Mapping[ConvKey, bool] | None] = ContextVar("gemm_choices", default=None)
_TRAIN_CHOICES: ContextVar[Mapping[ConvKey, bool] | None] = ContextVar("gemm_train_choices", default=None)
_SEEN: ContextVar[list[ConvKey] | None] = ContextVar("seen_convs", default=None)


def conv_key(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> ConvKey:
    """The shape of one convolution call, the key of a calibrated choice."""
    n, c, h, w = x.shape
    return (n, c, h, w, weight.shape[0], weight.shape[-1], stride, padding)


@contextlib.contextmanager
def kernel_choices(choices: Mapping[ConvKey, bool] | None, backward: bool = False) -> Iterator[None]:
    """Inside: a forward-only convolution (with `backward`: one a backward follows) whose shape is in `choices`
    runs as a GEMM exactly when it says True; None: every convolution follows the shape rule."""
    with scoped(_TRAIN_CHOICES if backward else _CHOICES, choices):
        yield


@contextlib.contextmanager
def recording_convs() -> Iterator[list[ConvKey]]:
    """Inside: every convolution that goes through conv2d() appends its key to the yielded list."""
    with scoped(_SEEN, []) as seen:
        yield seen


def gemm_applies(x: torch.Tensor, weight: torch.Tensor, padding: int) -> bool:
    """Whether the GEMM path can run this convolution at all (and its patch matrix of a 1x1 kernel is a view)."""
    if padding != weight.shape[-1] // 2 or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4:
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    # Only on channels-last maps, where the patch matrix of a 1x1 kernel is a view, not a copy.
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def prefers_gemm(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> bool:
    """Whether this convolution runs faster as a GEMM than as a oneDNN convolution here.

    A call whose shape was calibrated for its kind (forward-only, or with a backward; inside kernel_choices)
    follows the measurement; everything else follows GEMM_MAX_POSITIONS, the deterministic rule.
    """
    if not gemm_applies(x, weight, padding):
        return False
    backward = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    choices = (_TRAIN_CHOICES if backward else _CHOICES).get()
    if choices is not None:
        choice = choices.get(conv_key(x, weight, stride, padding))
        if choice is not None:
            return choice
    k = weight.shape[-1]
    limit = GEMM_MAX_POSITIONS.get((k, stride, backward), 0)
    return _out_size(x.shape[2], k, stride, padding) * _out_size(x.shape[3], k, stride, padding) <= limit


def conv2d(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, padding: int = 0) -> torch.Tensor:
    """A bias-free, ungrouped square convolution, run by whichever of GEMM or oneDNN is faster for its shape."""
    if torch.compiler.is_compiling():
        # Dynamo cannot trace ContextVar.get (a graph break at every convolution, and then the recompile limit
        # sends the whole model back to eager); inductor chooses and prepacks its own convolution kernels.
        return F.conv2d(x, weight, None, stride, padding)
    seen = _SEEN.get()
    if seen is not None:
        seen.append(conv_key(x, weight, stride, padding))
    if prefers_gemm(x, weight, stride, padding):
        return gemm_conv2d(x, weight, stride, padding)
    return F.conv2d(x, weight, None, stride, padding)
