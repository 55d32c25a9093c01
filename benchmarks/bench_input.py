"""Input-pipeline throughput: training images/s (decode JPEG, squash, random crop, flip) at 0, 1 and 2 workers.

Writes a folder of JPEGs (default 256 images of 500x375, about the size of ImageNet / Pets photos), then pulls
training batches through `bigtransfer.data.datasets.make_loader` exactly as fine-tuning does and reports images/s once the
workers are warm. Run: `.venv/bin/python benchmarks/bench_input.py [--workers 0 1 2] [--crop 128]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bigtransfer.data.datasets import ImageDataset, load_splits, make_loader, train_transform


def write_jpegs(root: Path, n: int, size: tuple[int, int], classes: int = 4) -> None:
    """n smooth-plus-noise photos-like JPEGs (quality 90) spread over `classes` folders."""
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        base = np.stack([np.sin(xx / (7 + i % 13)) * 60, np.cos(yy / (5 + i % 7)) * 60, (xx + yy) % 90], -1) + 128
        img = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:05d}.jpg", quality=90)


def measure(dataset: ImageDataset, batch: int, workers: int, batches: int) -> float:
    """Images/s over `batches` batches, after one warm-up batch (worker start-up is not counted)."""
    loader = make_loader(dataset, batch, shuffle=True, seed=0, workers=workers, steps=batches + 1)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    count = sum(len(y) for _, y in it)
    return count / (time.perf_counter() - start)


def main() -> None:
    """Run the benchmark and print one line per worker count."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    p.add_argument("--precrop", type=int, default=160)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=24, help="timed batches per setting")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the median is reported")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(Path(tmp), args.images, tuple(args.size))
        splits = load_splits(tmp, check_images=False)
        ds = ImageDataset(splits.train, train_transform(args.precrop, args.crop))
        print(f"{len(ds)} JPEGs {args.size[0]}x{args.size[1]} -> squash {args.precrop}, crop {args.crop}, flip; "
              f"batch {args.batch}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
        rates: dict[int, list[float]] = {w: [] for w in args.workers}
        for _ in range(args.rounds):  # interleaved rounds, so load from other processes hits every setting alike
            for w in args.workers:
                rates[w].append(measure(ds, args.batch, w, args.batches))
        results = {w: statistics.median(r) for w, r in rates.items()}
        for w, r in rates.items():
            print(f"  workers {w}: {results[w]:8.1f} images/s (median of {len(r)}: {', '.join(f'{x:.1f}' for x in r)})")
        print(f"  load after: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"images_per_s": results, "args": {k: str(v) for k, v in vars(args).items()}}))


if __name__ == "__main__":
    main()
