"""Why small batches are slow on a CPU: a model's convolutions alone, back to back, and with weights packed once.

Records the convolution shapes of one `prepare_for_inference` forward (fp32, the torch engine) and replays them:
each alone and warm (summed), all back to back, back to back with a memory pass between them (caches cold), and,
where PyTorch has the private op inductor's freezing uses, on oneDNN with each weight reordered into its blocked
layout once beforehand (what onnxruntime and `--engine compile` do). RESULTS.md, seventh session, reads the output.

    python benchmarks/bench_conv_replay.py                   # R50x1, 128 px, batch 1
    python benchmarks/bench_conv_replay.py --arch R50x1 --size 224 --batch 8
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bigtransfer.deploy.inference_model import prepare_for_inference
from bigtransfer.model.gemmconv import recording_convs
from bigtransfer.model.resnetv2 import ResNetV2

Call = tuple[torch.Tensor, torch.Tensor, int, int]  # input, weight, stride, padding


def ms_per_call(fn: Callable[[], object], reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def recorded_calls(fast, x: torch.Tensor) -> list[Call]:
    """One (input, weight, stride, padding) per convolution of one forward, GEMM-path ones included, on random
    data of the recorded shapes (the data does not change these kernels' speed: measured on the model's own)."""
    with recording_convs() as keys:
        fast(x)
    return [(torch.randn(n, cin, h, w).contiguous(memory_format=torch.channels_last),
             torch.randn(cout, cin, k, k).contiguous(memory_format=torch.channels_last), stride, pad)
            for n, cin, h, w, cout, k, stride, pad in keys]


def _pair(v: int | tuple[int, int]) -> list[int]:
    return list(v) if isinstance(v, tuple | list) else [v, v]


def prepacked(calls: list[Call]) -> Callable[[], object] | None:
    """The calls on oneDNN with weights reordered once, or None where this PyTorch lacks the private ops."""
    try:
        packed = [(i, torch._C._nn.mkldnn_reorder_conv2d_weight(w.contiguous().to_mkldnn(), _pair(p), _pair(s),
                                                                 [1, 1], 1, list(i.shape)), s, p)
                  for i, w, s, p in calls]
        op = torch.ops.mkldnn._convolution_pointwise
    except (AttributeError, RuntimeError):
        return None
    return lambda: [op(i, w, None, _pair(p), _pair(s), [1, 1], 1, "none", [], "") for i, w, s, p in packed]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="R50x1")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    torch.manual_seed(0)
    fast = prepare_for_inference(ResNetV2(args.arch, 1000).eval(), "fp32")
    x = torch.rand(args.batch, 3, args.size, args.size)
    rows: dict[str, float] = {}
    with torch.no_grad():
        fast(x)  # calibrates the kernels for this shape
        calls = recorded_calls(fast, x)
        flush = torch.empty(32 * 1024 * 1024)  # 128 MB: a pass over it evicts the weights from L2 and most of L3
        rows["the model's forward"] = ms_per_call(lambda: fast(x))
        rows["its convolutions, each alone and warm, summed"] = sum(
            ms_per_call(lambda c=c: F.conv2d(c[0], c[1], None, c[2], c[3]), 10) for c in calls)
        rows["its convolutions back to back (F.conv2d)"] = ms_per_call(
            lambda: [F.conv2d(i, w, None, s, pad) for i, w, s, pad in calls])
        rows["the same with a 128 MB memory pass between them (passes not counted)"] = ms_per_call(
            lambda: [(flush.add_(0.0), F.conv2d(i, w, None, s, pad)) for i, w, s, pad in calls], 5) - ms_per_call(
            lambda: [flush.add_(0.0) for _ in calls], 5)
        packed = prepacked(calls)
        if packed is not None:
            rows["back to back on oneDNN, weights reordered once"] = ms_per_call(packed)
    weights = sum(w.numel() * 4 for _, w, _, _ in calls) / 1e6
    print(f"{args.arch} {args.size}px batch {args.batch} fp32: {len(calls)} convolutions, {weights:.0f} MB of weights")
    print("| what | ms |\n|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value:.1f} |")


if __name__ == "__main__":
    main()
