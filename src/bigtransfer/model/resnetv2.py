"""ResNet-v2 with GroupNorm and Weight Standardization: the BiT architecture family."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.errors import UserError
from .gemmconv import conv2d
from .memory import check_fits, parameter_count
from .normlayout import LayoutGroupNorm

# The authors' release standardizes with eps 1e-10; timm and HF transformers use 1e-8.
WS_EPS_RELEASE = 1e-10
WS_EPS_PEERS = 1e-8
GN_GROUPS = 32
GN_EPS = 1e-5

DEPTHS: dict[int, tuple[int, int, int, int]] = {
    14: (1, 1, 1, 1),
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
RELEASED_ARCHS = ("R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4")

# How convolutions and the root's max-pool pad their input. "fixed": the authors' symmetric zero padding (3 at the
# root conv, 1 before the unpadded pool, 1 at each 3x3). "same": TensorFlow's dynamic 'SAME' padding in every conv
# (strided convs pad total max((ceil(n/s) - 1) * s + k - n, 0), the extra pixel at the bottom/right) and an unpadded
# root pool, as HF transformers builds BiT with global_padding="SAME". "same_pool": "same" plus 'SAME' zero padding
# before the root pool (HF's embedding_dynamic_padding=True, the ViT-hybrid backbones).
PADDINGS = ("fixed", "same", "same_pool")

_ARCH_RE = re.compile(r"^R(\d+)x(\d+(?:\.\d+)?)$")


@dataclass(frozen=True)
class Arch:
    """A ResNet-v2 shape: units per block and a width multiplier."""

    depth: int
    width: float

    @property
    def units(self) -> tuple[int, int, int, int]:
        return DEPTHS[self.depth]

    @property
    def name(self) -> str:
        w = int(self.width) if float(self.width).is_integer() else self.width
        return f"R{self.depth}x{w}"

    @property
    def root_channels(self) -> int:
        return int(64 * self.width)

    @property
    def feature_dim(self) -> int:
        return int(2048 * self.width)


def parse_arch(name: str) -> Arch:
    """Parse an architecture name such as 'R50x1' or 'R26x0.5'."""
    m = _ARCH_RE.match(name)
    if not m:
        raise UserError(f"not an architecture name: {name!r} (expected R<depth>x<width>, e.g. R50x1)")
    depth, width = int(m.group(1)), float(m.group(2))
    if depth not in DEPTHS:
        raise UserError(f"unknown depth {depth} in {name!r}; choose one of {sorted(DEPTHS)}")
    if width <= 0 or (width * 2) != int(width * 2):
        raise UserError(f"width in {name!r} must be a positive multiple of 0.5")
    return Arch(depth, width)


def check_ws_eps(eps: object) -> float:
    """The weight-standardization eps as a float; refuse what is not a finite positive number."""
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not (math.isfinite(eps) and eps > 0):
        # A zero, negative or NaN eps makes a constant kernel (or every kernel) standardize to NaN.
        raise UserError(f"ws_eps must be a finite positive number, got {eps!r}")
    return float(eps)


def check_num_classes(num_classes: object) -> int:
    """Refuse a class count that is not an int >= 0 (0: features only, no head); bools and strings are refused."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an int >= 0 (0: no head), got {num_classes!r}")
    if num_classes < 0:
        raise UserError(f"num_classes must be >= 0 (0: no head), got {num_classes}")
    return num_classes


def check_padding(padding: object) -> str:
    """The padding mode, refused clearly when it is not one of PADDINGS."""
    if padding not in PADDINGS:
        raise UserError(f"unknown padding mode {padding!r}; choose one of {', '.join(PADDINGS)}")
    return str(padding)


def same_pad(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """`x` padded as TensorFlow's 'SAME' does for a `kernel` x `kernel` window at `stride` (extra at bottom/right)."""
    h, w = x.shape[-2:]
    ph = max((-(-h // stride) - 1) * stride + kernel - h, 0)
    pw = max((-(-w // stride) - 1) * stride + kernel - w, 0)
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=value)


def _conv_padding(kernel: int, stride: int, same: bool, fixed: int) -> tuple[int, bool]:
    """(static padding, pad dynamically in forward): 'SAME' is static only for stride 1 with an odd kernel."""
    if not same:
        return fixed, False
    if stride == 1 and kernel % 2 == 1:
        return (kernel - 1) // 2, False
    return 0, True


class StdConv2d(nn.Conv2d):
    """Conv2d whose kernel is standardized per output channel before every use.

    `same=True` pads as TensorFlow's 'SAME' (dynamically for strided convs) instead of the fixed `padding`.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, *,
                 eps: float = WS_EPS_RELEASE, same: bool = False, **kwargs) -> None:
        kwargs.setdefault("bias", False)
        static, self.dynamic_same = _conv_padding(kernel, stride, same, padding)
        super().__init__(cin, cout, kernel, stride=stride, padding=static, **kwargs)
        self.eps = eps

    def standardized_weight(self) -> torch.Tensor:
        """The kernel with zero mean and unit (biased) variance per output channel."""
        # layer_norm over (out_channels, fan_in) rows computes exactly (w - mean) / sqrt(var + eps) with the biased
        # variance, in one fused kernel each way: measured 1.4-1.6x faster than batch_norm on a (1, out, fan_in)
        # view and 4x faster than var_mean plus elementwise ops, on a training step's weight path.
        w = self.weight
        # A channels-last kernel is a contiguous (out, kh, kw, in) array: standardize that view, so neither
        # direction copies the kernel into another layout (statistics don't depend on the fan-in's order).
        cl = w.dim() == 4 and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)
        v = w.permute(0, 2, 3, 1) if cl else w
        rows = v.reshape(v.shape[0], -1)
        flat = F.layer_norm(rows, rows.shape[1:], eps=self.eps)
        return flat.reshape_as(v).permute(0, 3, 1, 2) if cl else flat.reshape_as(v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.standardized_weight()
        return _conv(self, x, w)


def _conv(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`conv`'s convolution of `x` with `weight`, through the GEMM/oneDNN dispatch where its geometry allows."""
    if getattr(conv, "dynamic_same", False):
        x = same_pad(x, conv.kernel_size[0], conv.stride[0])
    square = conv.stride[0] == conv.stride[1] and isinstance(conv.padding, tuple) and conv.padding[0] == conv.padding[1]
    if conv.bias is None and conv.groups == 1 and conv.dilation == (1, 1) and square:
        return conv2d(x, weight, conv.stride[0], conv.padding[0])
    return F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class PlainConv2d(nn.Conv2d):
    """Conv2d holding an already standardized kernel (the inference fast path), with the same dispatch."""

    dynamic_same = False  # set from the StdConv2d it replaces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _conv(self, x, self.weight)


def _gn(channels: int) -> LayoutGroupNorm:
    # nn.GroupNorm, plus the measured choice of kernel on channels-last maps (model/normlayout.py).
    return LayoutGroupNorm(GN_GROUPS, channels, eps=GN_EPS)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck unit; stride on the 3x3, projection from the activated input."""

    def __init__(self, cin: int, cout: int, cmid: int, stride: int, ws_eps: float, same: bool = False) -> None:
        super().__init__()
        self.gn1 = _gn(cin)
        self.conv1 = StdConv2d(cin, cmid, 1, eps=ws_eps, same=same)
        self.gn2 = _gn(cmid)
        self.conv2 = StdConv2d(cmid, cmid, 3, stride=stride, padding=1, eps=ws_eps, same=same)
        self.gn3 = _gn(cmid)
        self.conv3 = StdConv2d(cmid, cout, 1, eps=ws_eps, same=same)
        self.proj = StdConv2d(cin, cout, 1, stride=stride, eps=ws_eps, same=same) \
            if (stride != 1 or cin != cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place where autograd allows it (GroupNorm's backward needs its input, not its output; a conv's
        # backward doesn't need its output): saves a fresh allocation and a memory pass per op.
        a = F.relu(self.gn1(x), inplace=True)
        shortcut = self.proj(a) if self.proj is not None else x
        y = self.conv1(a)
        y = self.conv2(F.relu(self.gn2(y), inplace=True))
        y = self.conv3(F.relu(self.gn3(y), inplace=True))
        return y.add_(shortcut)


class Root(nn.Module):
    """7x7/2 standardized conv, zero pad 1, 3x3/2 max-pool without padding (no norm, no ReLU); see PADDINGS."""

    def __init__(self, channels: int, ws_eps: float, padding: str = "fixed") -> None:
        super().__init__()
        self.padding = padding
        self.conv = StdConv2d(3, channels, 7, stride=2, padding=3, eps=ws_eps, same=padding != "fixed")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.padding == "fixed":
            # Zero padding then an unpadded pool: not the same as the pool's own -inf padding,
            # because the conv output can be negative.
            y = F.pad(y, (1, 1, 1, 1))
        elif self.padding == "same_pool":
            y = same_pad(y, 3, 2)
        return F.max_pool2d(y, kernel_size=3, stride=2)


class ResNetV2(nn.Module):
    """BiT ResNet-v2: root, four pre-activation stages, GN+ReLU+pool+1x1-conv head.

    `num_classes=0` builds no head (as timm does): forward() then returns the pooled pre-logits.
    Input: float (N, 3, H, W) images in [-1, 1]; a floating dtype other than the weights' is cast to theirs,
    integer images (uint8 pixels) are refused, since their scale is not the model's.
    """

    def __init__(self, arch: Arch | str, num_classes: int = 1000, ws_eps: float = WS_EPS_RELEASE,
                 zero_head: bool = True, padding: str = "fixed") -> None:
        super().__init__()
        self.arch = parse_arch(arch) if isinstance(arch, str) else arch
        check_num_classes(num_classes)
        ws_eps = check_ws_eps(ws_eps)
        self.padding = check_padding(padding)
        params = parameter_count(self.arch, num_classes)  # before allocating: R14x1000 would not fit anywhere
        check_fits(4 * params, f"{self.arch.name} with {num_classes} classes ({params:,} parameters)",
                   "choose a smaller width or depth")
        self.ws_eps = ws_eps
        self.labels: list[str] | None = None
        # How inputs should be prepared (see bigtransfer.model.preprocess.resolve_data_config); None: not recorded.
        self.data_config: dict | None = None
        w = self.arch.width
        self.root = Root(self.arch.root_channels, ws_eps, padding)
        cin = self.arch.root_channels
        stages = []
        for i, n_units in enumerate(self.arch.units):
            cmid = int(64 * w * 2**i)
            cout = cmid * 4
            units = []
            for j in range(n_units):
                stride = 1 if (i == 0 or j > 0) else 2
                units.append(PreActBottleneck(cin, cout, cmid, stride, ws_eps, same=padding != "fixed"))
                cin = cout
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)
        # The first unit's gn1 sees the root's max-pool output (all maxima: group mean/std about 2.6, against < 0.3
        # at every other GroupNorm of random and trained models). PyTorch's channels-last CPU GroupNorm computes the
        # variance as E[x^2] - E[x]^2, whose error grows with (mean/std)^2: on that one input it measured 9e-6
        # relative error against 2e-7 in NCHW, and grew to 1.3e-4 at R101x1's logits. So that GroupNorm alone
        # always runs on an NCHW copy (two copies of one stage-1 map), whatever the timings say.
        self.stages[0][0].gn1.always_nchw = True
        self.norm = _gn(cin)
        self.head: nn.Conv2d | None = nn.Conv2d(cin, num_classes, 1, bias=True) if num_classes else None
        self.grad_checkpointing = False
        self._init_weights(zero_head)

    def _init_weights(self, zero_head: bool) -> None:
        for m in self.modules():
            if isinstance(m, StdConv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_head and self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    @property
    def num_classes(self) -> int:
        return self.head.out_channels if self.head is not None else 0

    @property
    def feature_dim(self) -> int:
        return self.norm.num_channels

    def reset_head(self, num_classes: int, zero_init: bool = True) -> None:
        """Replace the classifier with a new one of `num_classes` outputs (zeros by default; 0: no head)."""
        check_num_classes(num_classes)
        ref = self.norm.weight
        self.head = nn.Conv2d(self.feature_dim, num_classes, 1, bias=True).to(ref.device, ref.dtype) \
            if num_classes else None
        if zero_init and self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.labels = None

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """`x` checked to be a batch of RGB images, in the weights' floating dtype."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise UserError(f"{self.arch.name} takes (N, 3, H, W) images, got {shape}")
        dtype = self.root.conv.weight.dtype
        if x.dtype != dtype:
            if not x.is_floating_point():
                raise TypeError(f"{self.arch.name} takes float images in [-1, 1], got {x.dtype}; "
                                "convert 0..255 pixels with x.float() / 127.5 - 1")
            if not torch.is_autocast_enabled(x.device.type):  # autocast chooses each op's dtype itself
                x = x.to(dtype)
        return x

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each unit's activations in backward instead of keeping them (less memory, more compute)."""
        self.grad_checkpointing = enabled

    def _stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return stage(x)
        for unit in stage:
            # Only each unit's input is kept for backward. The units draw no random numbers, so the RNG state
            # need not be saved and restored around the recomputation.
            x = checkpoint(unit, x, use_reentrant=False, preserve_rng_state=False)
        return x

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps after the root and after each of the four stages (strides 4, 4, 8, 16, 32)."""
        feats = [self.root(self._input(x))]
        for stage in self.stages:
            feats.append(self._stage(stage, feats[-1]))
        return feats

    def forward_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Final normalized, activated feature map (N, 2048*w, H/32, W/32)."""
        y = self.root(self._input(x))
        for stage in self.stages:
            y = self._stage(stage, y)
        return F.relu(self.norm(y), inplace=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logits (N, 2048*w)."""
        return self.forward_maps(x).mean(dim=(2, 3))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from pooled pre-logits (the pre-logits themselves when the model has no head)."""
        if self.head is None:
            return features
        return self.head(features[:, :, None, None]).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def count_parameters(model: nn.Module, include_head: bool = True) -> int:
    """Number of parameters, optionally without the classifier head."""
    total = sum(p.numel() for p in model.parameters())
    if not include_head and isinstance(model, ResNetV2) and model.head is not None:
        total -= sum(p.numel() for p in model.head.parameters())
    return total
