"""An independent BiT forward pass written straight from the spec, over the authors' .npz arrays.

It shares no code with bigtransfer: it reads the authors' key names and HWIO kernels itself and
computes in float64, so agreement with bigtransfer's model is evidence, not a tautology.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F

UNITS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3), 26: (2, 2, 2, 2), 14: (1, 1, 1, 1)}


def random_authors_arrays(depth: int, width: float, classes: int, seed: int = 0,
                          conv_suffix: str = "") -> dict[str, np.ndarray]:
    """Random weights under the authors' exact key names and HWIO layout."""
    rng = np.random.default_rng(seed)
    conv = f"standardized_conv2d{conv_suffix}"
    out: dict[str, np.ndarray] = {}

    def kernel(h, cin, cout):
        return rng.normal(0, 1, (h, h, cin, cout)).astype(np.float32)

    def gn(prefix, c):
        out[f"{prefix}/group_norm/gamma"] = rng.normal(1, 0.2, c).astype(np.float32)
        out[f"{prefix}/group_norm/beta"] = rng.normal(0, 0.2, c).astype(np.float32)

    root = int(64 * width)
    out[f"resnet/root_block/{conv}/kernel"] = kernel(7, 3, root)
    cin = root
    for b, n in enumerate(UNITS[depth], start=1):
        cmid = int(64 * width * 2 ** (b - 1))
        cout = 4 * cmid
        for u in range(1, n + 1):
            p = f"resnet/block{b}/unit{u:02d}"
            gn(f"{p}/a", cin)
            out[f"{p}/a/{conv}/kernel"] = kernel(1, cin, cmid)
            gn(f"{p}/b", cmid)
            out[f"{p}/b/{conv}/kernel"] = kernel(3, cmid, cmid)
            gn(f"{p}/c", cmid)
            out[f"{p}/c/{conv}/kernel"] = kernel(1, cmid, cout)
            if u == 1:
                out[f"{p}/a/proj/{conv}/kernel"] = kernel(1, cin, cout)
            cin = cout
    out["resnet/group_norm/gamma"] = rng.normal(1, 0.2, cin).astype(np.float32)
    out["resnet/group_norm/beta"] = rng.normal(0, 0.2, cin).astype(np.float32)
    out["resnet/head/conv2d/kernel"] = rng.normal(0, 0.05, (1, 1, cin, classes)).astype(np.float32)
    out["resnet/head/conv2d/bias"] = rng.normal(0, 0.05, classes).astype(np.float32)
    return out


def reference_logits(arrays: dict[str, np.ndarray], x: torch.Tensor, depth: int, eps: float = 1e-10) -> torch.Tensor:
    """Logits of the spec's ResNet-v2 (float64), from the authors' arrays."""
    # Re-exported files may spell convs standardized_conv2d_<N>; look names up with that suffix removed.
    plain = {re.sub(r"standardized_conv2d_\d+", "standardized_conv2d", k): v for k, v in arrays.items()}

    def arr(name):
        return plain[name]

    def conv(h, name, stride=1, pad=0):
        k = torch.from_numpy(np.asarray(arr(name), dtype=np.float64)).permute(3, 2, 0, 1)
        m = k.mean(dim=(1, 2, 3), keepdim=True)
        v = ((k - m) ** 2).mean(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(h, (k - m) / torch.sqrt(v + eps), stride=stride, padding=pad)

    def gn_relu(h, prefix):
        g = torch.from_numpy(np.asarray(arr(f"{prefix}/gamma"), dtype=np.float64))
        b = torch.from_numpy(np.asarray(arr(f"{prefix}/beta"), dtype=np.float64))
        return F.relu(F.group_norm(h, 32, g, b, eps=1e-5))

    c = "standardized_conv2d"
    h = conv(x.double(), f"resnet/root_block/{c}/kernel", stride=2, pad=3)
    h = F.max_pool2d(F.pad(h, (1, 1, 1, 1), value=0.0), 3, 2)
    for b, n in enumerate(UNITS[depth], start=1):
        for u in range(1, n + 1):
            p = f"resnet/block{b}/unit{u:02d}"
            stride = 2 if (u == 1 and b > 1) else 1
            a = gn_relu(h, f"{p}/a/group_norm")
            short = conv(a, f"{p}/a/proj/{c}/kernel", stride=stride) if u == 1 else h
            y = conv(a, f"{p}/a/{c}/kernel")
            y = conv(gn_relu(y, f"{p}/b/group_norm"), f"{p}/b/{c}/kernel", stride=stride, pad=1)
            y = conv(gn_relu(y, f"{p}/c/group_norm"), f"{p}/c/{c}/kernel")
            h = y + short
    h = gn_relu(h, "resnet/group_norm").mean(dim=(2, 3))
    w = torch.from_numpy(np.asarray(plain["resnet/head/conv2d/kernel"], dtype=np.float64))[0, 0]
    bias = torch.from_numpy(np.asarray(plain["resnet/head/conv2d/bias"], dtype=np.float64))
    return h @ w + bias
