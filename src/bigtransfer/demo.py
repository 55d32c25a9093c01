"""The demo: few-shot fine-tuning on scikit-learn's handwritten digits, written out as a real image folder.

`write_digits` turns sklearn's 1,797 8x8 digits into grey PNG files under DIR/digits/train/<digit>/ and
DIR/digits/test/<digit>/ with a fixed split; `run_demo` fine-tunes each entry of `DEMO_MODELS` on a K-shot subset of
train/ and reports top-1 on test/. The settings are chosen to finish in about a minute on 2 CPU cores. A pre-trained
model is one more `DemoModel` entry (same data, same loop), which turns the demo into a transfer comparison.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .atomic import atomic_path

TEST_PER_CLASS = 30  # fixed test split: 300 images
SPLIT_SEED = 0


@dataclass(frozen=True)
class DemoModel:
    """One fine-tune of the demo: a model name, optional starting weights, and its base lr (at batch 512)."""

    title: str
    model: str
    weights: str | None = None
    base_lr: float = 0.003

    @property
    def slug(self) -> str:
        return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in self.title.lower())


# From scratch, the HyperRule's lr (0.003 at batch 512, tuned for pre-trained weights) barely moves a random
# network in 60 steps. Measured on this demo (60 steps of 32, 32 px crops, no flips, seed 0): base lr 0.5 (0.031 at
# batch 32) reached top-1 0.76, 1.0 only 0.25 (the loss climbs while the lr is at its peak), 2.0 fell to chance.
DEMO_MODELS: tuple[DemoModel, ...] = (DemoModel("R14x0.5 from scratch", "R14x0.5", base_lr=0.5),)


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs with (small enough for a CPU)."""

    shots: int = 10
    steps: int = 60
    batch: int = 32
    # The HyperRule would squash these 8x8 images to 160 and crop 128. With base lr 0.5: 24 px crops scored 0.81
    # (seed 1: 0.71) and cost less than 32 px (0.76); 16 px scored 0.67 and was no faster on 2 cores.
    resolution: tuple[int, int] = (30, 24)
    flip: bool = False  # a mirrored digit is not the same digit
    seed: int = 0
    workers: int = 0  # 100 tiny PNGs decode faster in-process than worker processes start
    test_per_class: int = TEST_PER_CLASS


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise RuntimeError("the demo needs scikit-learn for its image set: pip install 'bigtransfer[demo]' "
                           "(or scikit-learn)") from None
    d = load_digits()
    return d.images, d.target


def write_digits(root: str | os.PathLike, test_per_class: int = TEST_PER_CLASS) -> Path:
    """Write sklearn's digits as 8x8 grey PNGs: root/train/<digit>/ and root/test/<digit>/ (a fixed split; reused)."""
    root = Path(root)
    images, labels = _load_digits()
    rng = np.random.default_rng(SPLIT_SEED)
    plan: list[tuple[Path, np.ndarray]] = []
    for digit in range(10):
        idx = np.flatnonzero(labels == digit)
        idx = idx[rng.permutation(len(idx))]
        for rank, i in enumerate(idx):
            split = "test" if rank < test_per_class else "train"
            plan.append((root / split / str(digit) / f"{i:04d}.png", images[i]))
    wanted = {path for path, _ in plan}
    for stale in set(root.rglob("*.png")) - wanted:  # left by a different split: would leak into this one
        stale.unlink()
    for path, a in plan:
        if path.is_file():  # written before (each file is written atomically, so it is complete)
            continue
        pixels = np.clip(np.rint(a * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # sklearn's 0..16 grey levels
        with atomic_path(path) as tmp:
            Image.fromarray(pixels).save(tmp, format="PNG")
    return root


def run_demo(out: str | os.PathLike = "bigtransfer-demo", settings: DemoSettings | None = None,
             models: tuple[DemoModel, ...] = DEMO_MODELS, quiet: bool = False) -> list[dict[str, Any]]:
    """Write the digits, fine-tune every demo model on them, print and return one summary per model."""
    from .finetune import FinetuneConfig, run_finetune

    s = settings or DemoSettings()
    out = Path(out).resolve()
    t0 = time.perf_counter()
    data = write_digits(out / "digits", s.test_per_class)
    n_train, n_test = (sum(1 for _ in (data / split).rglob("*.png")) for split in ("train", "test"))
    print(f"Demo data: scikit-learn's handwritten digits as 8x8 grey PNGs in {data} "
          f"(train/: {n_train} images, test/: {n_test} images, 10 classes).")
    print(f"Chosen to run in about a minute on 2 CPU cores: {s.shots} training images per class "
          f"({10 * s.shots} in all), {s.steps} steps of batch {s.batch}, images squashed to "
          f"{s.resolution[0]}x{s.resolution[0]} with random {s.resolution[1]}x{s.resolution[1]} crops "
          f"(the HyperRule would use 160/128), {'with' if s.flip else 'no'} horizontal flips"
          f"{'' if s.flip else ' (a mirrored digit is another shape)'}, seed {s.seed}.")
    summaries = []
    for m in models:
        print(f"\n== {m.title}: model {m.model}, base lr {m.base_lr:g} at batch 512 "
              f"(= {m.base_lr * s.batch / 512:.4g} at batch {s.batch}) ==")
        config = FinetuneConfig(data=str(data), out=str(out / m.slug), model=m.model, weights=m.weights,
                                examples_per_class=s.shots, seed=s.seed, steps=s.steps, batch=s.batch,
                                resolution=s.resolution, flip=s.flip, workers=s.workers, base_lr=m.base_lr,
                                eval_every=s.steps, quiet=True, silent=quiet, overwrite=True)
        summaries.append(run_finetune(config))
    print(f"\nDemo results ({s.shots}-shot digits, top-1 on the {n_test} test images; chance is 0.10):")
    for m, r in zip(models, summaries, strict=True):
        print(f"  {m.title:28s} top-1 {r['top1']:.3f}  top-5 {r['top5']:.3f}  ({r['wall_time_s']:.0f} s)")
        run_dir = Path(r["checkpoint"]).parent
        print(f"    run: {run_dir}  (summary.json, metrics.jsonl, config.json)")
        print(f"    checkpoint: {r['checkpoint']}")
        print(f"    plots: {', '.join(Path(p).name for p in r['plots'])} in {run_dir}")
    print(f"Demo finished in {time.perf_counter() - t0:.0f} s. Same on your own images: bigtransfer finetune "
          "--data YOUR_FOLDER --model BiT-M-R50x1 --out RUN")
    return summaries
