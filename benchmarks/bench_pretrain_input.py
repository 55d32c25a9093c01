"""Pre-training input cost per image: the shard path (JPEG decode + Pillow Inception crop) against a packed set.

Pulls training micro-batches through `bigtransfer.data.pretraining.train_batches` exactly as `pretrain` does, in
this process with `--threads` torch threads and no worker processes, so the figure is the CPU time input takes
away from the model. Needs a corpus and its packed copy (docs/corpus.md: `bigtransfer corpus`, `bigtransfer pack`).
Run: `.venv/bin/python benchmarks/bench_pretrain_input.py --shards CORPUS --packed PACKED [--size 48] [--batch 128]`.
The two paths are measured back to back in one run, so a background job slows both alike; say if one was running.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time

import torch

from bigtransfer.data.pretraining import load_pretrain_data, train_batches


def cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform module says."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def images_per_s(source: str, size: int, batch: int, batches: int) -> float:
    """Input images/s over `batches` micro-batches after a first one (which fills buffers)."""
    data = load_pretrain_data(source)
    stream = train_batches(data, size, batch, 0, 0, 1, 1, 0, batches + 1, 0)
    next(stream)
    start, n = time.perf_counter(), 0
    for x, _ in itertools.islice(stream, batches):
        n += len(x)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True, help="a corpus folder (train/ + val/ shard sets) or a shard set")
    p.add_argument("--packed", required=True, help="the packed copy of the same corpus")
    p.add_argument("--size", type=int, default=48, help="crop size in pixels (default 48, BiT-Mini v2's)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}, {args.threads} torch thread(s), {args.size} px, "
          f"batch {args.batch}")
    rates = {name: images_per_s(src, args.size, args.batch, args.batches)
             for name, src in (("shards", args.shards), ("packed", args.packed))}
    for name, rate in rates.items():
        print(f"  {name:7s} {rate:8.0f} images/s  ({1000 / rate:.2f} ms per image)")
    print(f"  packed / shards: {rates['packed'] / rates['shards']:.1f}x")


if __name__ == "__main__":
    main()
