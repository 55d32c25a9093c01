"""Pre-training scale-out figures for docs/scaling.md: measured CPU throughput, computed GPU memory and FLOPs.

Three parts, each printed as a Markdown table:

- ``--throughput``: measured. Generates a small multi-label image set, runs `bigtransfer pretrain` on 1 process
  (1 and 2 threads) and on 2 Gloo processes (torchrun, 1 thread each), and reads images/s from summary.json.
- ``--decode``: measured. Images/s of the pre-training input pipeline (decode a 500x375 JPEG, Inception crop to
  224, flip) on one CPU core.
- ``--plan``: computed, no GPU needed. For every released architecture with a BiT-M (21,843-class) head:
  parameters, training FLOPs per 224 px image (torch.utils.flop_counter on the meta device), and memory per GPU at
  batch 8 per device for DDP, FSDP and activation checkpointing. Activation memory is the bytes autograd saves
  for backward, counted with saved-tensor hooks during a forward pass of the real model on the meta device
  (shapes without storage), at 64 px for batch 1 and 2 and scaled exactly to 224 px (every feature map is
  (224/64)^2 larger; the standardized kernels that weight standardization saves do not grow with the batch).

Run: `.venv/bin/python benchmarks/bench_pretrain.py --plan --throughput --decode`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bigtransfer.model.resnetv2 import RELEASED_ARCHS, ResNetV2

GiB = 2**30
BYTES_FP32 = 4
# Assumptions for the computed GPU rates (not measurements): A100's dense bf16 peak from its datasheet, and the
# fraction of it a training step achieves.
PEAK_FLOPS = 312e12
UTILIZATION = 0.25
BIT_M_IMAGES = 90 * 14_197_122  # 90 epochs of ImageNet-21k (fall 2011 release)


# ---------------------------------------------------------------- computed: parameters, FLOPs, memory

def flops_per_image(model: ResNetV2, size: int = 224) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs for one image, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, size, size, device="meta")
    with FlopCounterMode(display=False) as fwd:
        model(x)
    with FlopCounterMode(display=False) as train:
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)
    return fwd.get_total_flops(), train.get_total_flops()


def saved_by_part(model: ResNetV2, batch: int, size: int) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes autograd saves for backward, per unit ('s.u') or 'outside' units; and each unit's input bytes."""
    from torch.autograd.graph import saved_tensors_hooks

    params = {id(p) for p in model.parameters()}
    seen: set[int] = set()
    saved: dict[str, int] = {}
    inputs: dict[str, int] = {}
    current = ["outside"]
    kept = []  # keep saved tensors alive so that id() stays unique during the pass

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in params and id(t) not in seen:
            seen.add(id(t))
            kept.append(t)
            saved[current[0]] = saved.get(current[0], 0) + t.numel() * t.element_size()
        return t

    hooks = []
    for s, stage in enumerate(model.stages):
        for u, unit in enumerate(stage):
            name = f"{s}.{u}"

            def enter(_m, args, name=name):
                current[0] = name
                inputs[name] = args[0].numel() * args[0].element_size()

            def leave(_m, _args, _out):
                current[0] = "outside"

            hooks += [unit.register_forward_pre_hook(enter), unit.register_forward_hook(leave)]
    try:
        with saved_tensors_hooks(pack, lambda t: t):
            model(torch.zeros(batch, 3, size, size, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return saved, inputs


def memory_plan(arch: str, classes: int = 21843, batch: int = 8, size: int = 224, gpus: tuple[int, ...] = (8, 64)) -> dict:
    """Computed bytes per GPU: model states, saved activations, and totals for DDP / FSDP / checkpointing."""
    with torch.device("meta"):
        model = ResNetV2(arch, classes)
    units = {f"{s}.{u}": unit for s, stage in enumerate(model.stages) for u, unit in enumerate(stage)}
    n_params = sum(p.numel() for p in model.parameters())
    biggest_unit = max(sum(p.numel() for p in unit.parameters()) for unit in units.values())
    outside_params = n_params - sum(sum(p.numel() for p in unit.parameters()) for unit in units.values())
    probe = 64  # every feature map at `size` is (size / probe)^2 larger (output stride 32 divides both)
    scale = (size / probe) ** 2
    s1, i1 = saved_by_part(model, 1, probe)
    s2, i2 = saved_by_part(model, 2, probe)

    def at(s_1: int, s_2: int) -> float:
        """Bytes at `batch` images of `size` px from measurements at 1 and 2 images of 64 px."""
        per_image = s_2 - s_1
        return (s_1 - per_image) + batch * per_image * scale

    full = at(sum(s1.values()), sum(s2.values()))
    constant = sum(s1.values()) - (sum(s2.values()) - sum(s1.values()))  # standardized kernels (and tiny terms)
    outside = at(s1.get("outside", 0), s2.get("outside", 0))
    unit_inputs = batch * sum(i1.values()) * scale  # inputs are batch-proportional
    largest_unit = max(at(s1.get(n, 0), s2.get(n, 0)) for n in units)
    ckpt = outside + unit_inputs + largest_unit  # kept inputs + one unit recomputed during its backward
    states = 3 * BYTES_FP32 * n_params  # weights, gradients, momentum (fp32 SGD)
    # FSDP FULL_SHARD: states / N, plus gathered full weights of the unit in use and the one prefetched and one
    # unit's full gradients before reduce-scatter (3 x unit), plus the root group (stem, final norm, head).
    gathered = 3 * BYTES_FP32 * biggest_unit + 2 * BYTES_FP32 * outside_params
    fwd, train = flops_per_image(model, size)
    row = {"arch": arch, "params": n_params, "biggest_unit_params": biggest_unit, "fwd_flops": fwd, "train_flops": train,
           "states": states, "activations": full, "ws_kernels": constant, "ckpt_activations": ckpt,
           "ddp": states + full, "ddp_ckpt": states + ckpt}
    for n in gpus:
        row[f"fsdp{n}"] = states / n + gathered + full
        row[f"fsdp{n}_ckpt"] = states / n + gathered + ckpt
    return row


def print_plan(batch: int = 8, gpus: int = 64) -> list[dict]:
    """Print the computed tables and return their rows."""
    rows = [memory_plan(a, batch=batch) for a in RELEASED_ARCHS]
    print(f"Computed (not measured): images/s per GPU = {UTILIZATION} x {PEAK_FLOPS / 1e12:.0f} TFLOP/s / training "
          f"FLOPs per image; BiT-M = {BIT_M_IMAGES:,} images on {gpus} GPUs; activation checkpointing adds one forward")
    print("| arch | train GFLOP/img | +ckpt | images/s/GPU | +ckpt | BiT-M days | +ckpt |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ckpt = r["train_flops"] + r["fwd_flops"]
        rate, rate_ckpt = (UTILIZATION * PEAK_FLOPS / f for f in (r["train_flops"], ckpt))
        days = [BIT_M_IMAGES / (x * gpus) / 86400 for x in (rate, rate_ckpt)]
        print(f"| {r['arch']} | {r['train_flops'] / 1e9:.1f} | {ckpt / 1e9:.1f} | {rate:.0f} | {rate_ckpt:.0f} | "
              f"{days[0]:.2f} | {days[1]:.2f} |")
    print()
    print(f"Computed (not measured): BiT-M head (21,843 classes), 224 px, batch {batch} per GPU, fp32 weights + SGD "
          "momentum, GiB per GPU")
    print("| arch | params | train GFLOP/img | states | saved acts (WS kernels) | DDP | DDP+ckpt | FSDP x8 | "
          "FSDP x8+ckpt | FSDP x64 | FSDP x64+ckpt |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        g = {k: f"{v / GiB:.1f}" for k, v in r.items() if isinstance(v, int | float)}
        print(f"| {r['arch']} | {r['params'] / 1e6:.1f}M | {r['train_flops'] / 1e9:.1f} | {g['states']} | "
              f"{g['activations']} ({g['ws_kernels']}) | {g['ddp']} | {g['ddp_ckpt']} | {g['fsdp8']} | "
              f"{g['fsdp8_ckpt']} | {g['fsdp64']} | {g['fsdp64_ckpt']} |")
    return rows


# ---------------------------------------------------------------- measured: CPU throughput and decoding

def write_images(root: Path, n: int, size: int = 96) -> Path:
    """n random-texture PNGs with 1-3 of 8 labels each, and their multi-label manifest."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        labels = sorted(rng.choice(8, size=int(rng.integers(1, 4)), replace=False).tolist())
        base = np.zeros((size, size, 3)) + np.array([(labels[0] * 30) % 255, 128, (len(labels) * 70) % 255])
        img = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "img" / f"{i}.png")
        lines.append(json.dumps({"path": f"img/{i}.png", "labels": [f"c{k}" for k in labels]}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root / "train.jsonl"


def throughput(arch: str = "R26x0.5", size: int = 64, batch: int = 32, steps: int = 30) -> list[dict]:
    """Measured images/s of `bigtransfer pretrain` on this CPU: 1 process (1 and 2 threads), 2 Gloo processes."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_images(Path(tmp), 256)
        args = ["pretrain", "--data", str(manifest), "--model", arch, "--steps", str(steps), "--batch", str(batch),
                "--resolution", str(size), "--workers", "0", "--quiet", "--eval-every", str(10 * steps)]
        setups = [("1 process, 1 thread", 1, "1"), ("1 process, 2 threads", 1, "2"),
                  ("2 processes (Gloo), 1 thread each", 2, "1")]
        for label, procs, threads in setups:
            out = Path(tmp) / f"run{procs}_{threads}"
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
                        "-m", "bigtransfer"] if procs > 1 else [sys.executable, "-m", "bigtransfer"]
            env = {**os.environ, "OMP_NUM_THREADS": threads}
            subprocess.run([*launcher, *args, "--out", str(out)], env=env, check=True, capture_output=True)
            s = json.loads((out / "summary.json").read_text())
            rows.append({"setup": label, "images_per_s": s["images_per_s"],
                         "per_process": s["images_per_s_per_process"], "updates": s["timed_updates"]})
    print(f"Measured on this machine ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end): "
          f"{arch} at {size} px, global batch {batch}, {steps} updates (first one not timed)")
    print("| setup | images/s (all processes) | images/s per process |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['images_per_s']:.1f} | {r['per_process']:.1f} |")
    return rows


def decode_rate(n: int = 200, size: tuple[int, int] = (500, 375)) -> float:
    """Measured images/s of decode + Inception crop to 224 + flip for JPEGs of `size` (w, h) on one core."""
    from bigtransfer.data.images import open_rgb
    from bigtransfer.data.pretraining import InceptionCrop

    rng = np.random.default_rng(0)
    blobs = []
    for i in range(16):
        yy, xx = np.mgrid[0:size[1], 0:size[0]]
        img = np.stack([np.sin(xx / (7 + i)) * 60, np.cos(yy / (5 + i)) * 60, (xx + yy) % 90], -1) + 128
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    crop = InceptionCrop(224)
    torch.set_num_threads(1)
    start = time.perf_counter()
    for i in range(n):
        crop(open_rgb(data=blobs[i % len(blobs)]), torch.Generator().manual_seed(i))
    rate = n / (time.perf_counter() - start)
    print(f"Measured: decode {size[0]}x{size[1]} JPEG + Inception crop to 224 + flip, one core "
          f"(load average {os.getloadavg()[0]:.1f}): {rate:.0f} images/s")
    return rate


def main() -> None:
    """Parse the flags and print the chosen tables."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", action="store_true", help="computed memory / FLOPs table")
    p.add_argument("--throughput", action="store_true", help="measured CPU images/s for 1 and 2 processes")
    p.add_argument("--decode", action="store_true", help="measured input-pipeline images/s on one core")
    p.add_argument("--batch", type=int, default=8, help="per-GPU batch for --plan (default 8)")
    a = p.parse_args()
    if not (a.plan or a.throughput or a.decode):
        p.error("choose at least one of --plan, --throughput, --decode")
    if a.plan:
        print_plan(a.batch)
    if a.decode:
        decode_rate(size=(500, 375))
        decode_rate(size=(256, 192))  # images stored pre-resized (shorter side 192-256) when writing shards
    if a.throughput:
        throughput()


if __name__ == "__main__":
    main()
