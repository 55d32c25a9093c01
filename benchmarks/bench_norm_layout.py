"""GroupNorm on channels-last maps: PyTorch's channels-last kernel against a round trip through an NCHW copy, per shape.

The shapes are those a model's inference meets (recorded from one forward pass of its frozen copy); each is timed as
`prepare_for_inference` times it (`bigtransfer.model.kernelcal.measure_norm`: best wall time of a few calls), the
best of `--repeats` measurements, in fp32 and bf16. Prints a markdown table (ms per call, the faster in bold) and, per
dtype, the GroupNorms' summed time per forward pass with the channels-last kernel everywhere and with each shape on
the faster way (what the measured choice saves).

Run: `.venv/bin/python benchmarks/bench_norm_layout.py [--arch R50x1] [--size 224] [--batch 8] [--repeats 3]`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

import torch

from bigtransfer.model import kernelcal
from bigtransfer.model.normlayout import NormKey, recording_norms
from bigtransfer.model.resnetv2 import ResNetV2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import cpu_description  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def norm_shapes(arch: str, size: int, batch: int) -> Counter[NormKey]:
    """How often each GroupNorm shape on a channels-last map occurs in one forward pass."""
    model = ResNetV2(arch, 1000).eval().to(memory_format=torch.channels_last)
    x = torch.zeros(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), recording_norms() as seen:
        model(x)
    return Counter(seen)


def best_times(key: NormKey, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    runs = [kernelcal.measure_norm(key, dtype) for _ in range(repeats)]
    return {name: min(r[name] for r in runs) for name in kernelcal.NORM_CANDIDATES}  # type: ignore[type-var]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="R50x1")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="measurements per shape and dtype; the best is kept")
    args = p.parse_args(argv)
    print(f"machine: {cpu_description()}\ntorch {torch.__version__}; {args.arch}, {args.size} px, batch {args.batch}\n")
    counts = norm_shapes(args.arch, args.size, args.batch)
    times = {(key, d): best_times(key, dtype, args.repeats) for key in counts for d, dtype in DTYPES.items()}
    print("| channels, map | per pass | " + " | ".join(f"{d} channels-last | {d} via NCHW" for d in DTYPES) + " |")
    print("|---|---|" + "---|---|" * len(DTYPES))
    for key, count in sorted(counts.items(), key=lambda kv: (kv[0][1], -kv[0][2])):
        cells = []
        for d in DTYPES:
            t = times[(key, d)]
            faster = min(t, key=t.__getitem__)
            cells += [f"**{t[c] * 1e3:.3f}**" if c == faster else f"{t[c] * 1e3:.3f}" for c in kernelcal.NORM_CANDIDATES]
        print(f"| {key[1]}, {key[2]}x{key[3]} | {count} | " + " | ".join(cells) + " |")
    print("\nGroupNorms per forward pass, ms (channels-last kernel everywhere -> each shape on the faster way):")
    for d in DTYPES:
        cl = sum(n * times[(k, d)]["cl"] for k, n in counts.items())
        best = sum(n * min(times[(k, d)].values()) for k, n in counts.items())
        print(f"- {d}: {cl * 1e3:.1f} -> {best * 1e3:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
