"""Fine-tuning throughput of R50x1 at 128 px, batch 8, fp32: the model step and the input pipeline, in images/s.

Three measurements, printed as lines (and as JSON with --json):

- model: `bigtransfer.transfer.finetune.train_step` (forward, backward, SGD momentum update) on in-memory tensors, median
  over timed steps after warm-up steps: what the model alone sustains.
- input: training batches of 500x375 JPEGs (decode, squash to 160, random 128 crop, flip) from
  `bigtransfer.data.datasets.make_loader` at 0 and 2 workers (`bench_input.measure`): what the pipeline alone sustains.
- loop: a short `run_finetune` over the same JPEGs; its summary.json splits the loop's time into waiting for data
  and computing (`train_images_per_s`, `input_images_per_s`, `data_wait_fraction`).

Run: `.venv/bin/python benchmarks/bench_finetune.py [--steps 8] [--threads 2] [--json out.json]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_input import measure, write_jpegs
from bigtransfer.data.datasets import ImageDataset, load_splits, train_transform
from bigtransfer.model.resnetv2 import ResNetV2
from bigtransfer.transfer.finetune import FinetuneConfig, run_finetune, train_step


def model_rate(arch: str, size: int, batch: int, steps: int, warmup: int) -> tuple[float, list[float]]:
    """Median images/s of full training steps on random inputs, and every timed step's seconds."""
    torch.manual_seed(0)
    model = ResNetV2(arch, 10).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    times = []
    for s in range(warmup + steps):
        t = time.perf_counter()
        train_step(model, opt, [(x, y)], batch=batch, lr=1e-3, step=s)
        if s >= warmup:
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times), times


def main() -> None:
    """Run the three measurements and print them."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="R50x1")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="timed model steps (and loop steps)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--images", type=int, default=96, help="JPEGs written for the input and loop measurements")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, object] = {"arch": args.arch, "crop": 128, "precrop": 160, "batch": args.batch,
                                  "threads": args.threads, "cpus": os.cpu_count(), "torch": torch.__version__,
                                  "load_before": os.getloadavg()[0]}
    print(f"{args.arch} at 128 px (squash 160, crop 128), batch {args.batch}, fp32, {args.threads} torch threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")

    rate, times = model_rate(args.arch, 128, args.batch, args.steps, args.warmup)
    results["model_images_per_s"] = rate
    results["model_step_s"] = times
    print(f"  model (train_step, in-memory batch): {rate:7.2f} images/s "
          f"(median of {len(times)} steps: {', '.join(f'{t:.2f}' for t in times)} s)")

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "jpegs"
        write_jpegs(data, args.images, (500, 375))
        ds = ImageDataset(load_splits(data, check_images=False).train, train_transform(160, 128))
        for w in args.workers:
            r = measure(ds, args.batch, w, batches=24)
            results[f"input_images_per_s_workers{w}"] = r
            print(f"  input pipeline, {w} workers (500x375 JPEG -> 128 crop): {r:7.1f} images/s")

        config = FinetuneConfig(data=str(data), out=str(Path(tmp) / "run"), model=args.arch, steps=args.steps,
                                batch=args.batch, resolution=(160, 128), eval_every=args.steps, quiet=True,
                                silent=True, workers=max(args.workers))
        s = run_finetune(config)
        results["loop"] = {k: s[k] for k in ("train_images_per_s", "input_images_per_s", "data_wait_fraction",
                                             "eval_images_per_s", "wall_time_s", "steps")}
        print(f"  loop (run_finetune, {args.steps} steps, {max(args.workers)} workers): model "
              f"{s['train_images_per_s']:.2f} images/s, waited for data {s['data_wait_fraction']:.1%} of the time "
              f"(input {s['input_images_per_s'] or float('inf'):.1f} images/s of waiting), "
              f"eval {s['eval_images_per_s']:.1f} images/s")
    results["load_after"] = os.getloadavg()[0]
    print(f"  load average after: {results['load_after']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
