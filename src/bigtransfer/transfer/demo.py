"""The demo: few-shot fine-tuning on two small image sets, each written out as a real image folder.

`DEMO_TASKS`: `write_emoji` unpacks 10 emoji classes that BiT-Mini never saw upstream (bundled JPEGs drawn by the
corpus's renderer: new classes, the upstream kind of picture) and `write_digits` turns sklearn's 1,797 8x8 digits
into grey PNG files (a far domain), each under DIR/<task>/train/<class>/ and DIR/<task>/test/<class>/ with a fixed
split. `run_demo` fine-tunes each entry of `DEMO_MODELS` on a K-shot subset of train/ and reports top-1 on test/. The
settings are chosen to finish in a few minutes on 2 CPU cores. A pre-trained model is one more `DemoModel` entry
(same data, same loop), which turns the demo into a transfer comparison.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..core.atomic import atomic_path, write_text
from ..core.errors import SetupError
from ..engine.plots import error_bar_plot
from .config import TEST_PER_CLASS, DemoSettings, FinetuneConfig, recommended_settings
from .finetune import run_finetune

SPLIT_SEED = 0
EMOJI_TAR = Path(__file__).with_name("demo_emoji.tar")


@dataclass(frozen=True)
class DemoModel:
    """One fine-tune of the demo: a model name, optional starting weights, and its base lr (at batch 512)."""

    title: str
    model: str
    weights: str | None = None
    base_lr: float | None = None  # None: the model's recommended value (BiT-Mini carries one), else 0.003

    @property
    def slug(self) -> str:
        return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in self.title.lower())


# Base lr at batch 512, the same for both models (the rule's 0.003 barely moves either in 60 steps of 32). It is also
# BiT-Mini v2's recommended value: on the digits (3 seeds, 1/5/10 shots) 0.5 was the best of 0.05-1.2 at 5 and 10
# shots, 0.8 became unstable, 1.2 diverged (docs/models/BiT-Mini.md). For R14x0.5 from scratch at 30/24 px: 0.5
# reached 0.76-0.81, 1.0 only 0.25, 2.0 fell to chance.
DEMO_LR = 0.5
DEMO_MODELS: tuple[DemoModel, ...] = (
    DemoModel("BiT-Mini-R26x0.5 (pre-trained)", "BiT-Mini-R26x0.5", base_lr=DEMO_LR),
    DemoModel("R26x0.5 from scratch", "R26x0.5", base_lr=DEMO_LR),
)


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SetupError("the demo needs scikit-learn for its image set: pip install 'bigtransfer[demo]' "
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


def _fine_tune(config: Any) -> dict[str, Any]:
    """One demo fine-tune in a worker process, on one thread (several run side by side)."""
    torch.set_num_threads(1)
    return run_finetune(config)


def _stats(values: list[float]) -> tuple[float, float, float]:
    v = sorted(values)
    return float(np.median(v)), v[0], v[-1]


def _safe_member(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return bool(parts) and not name.startswith("/") and ".." not in parts and parts[0] == "emoji"


def write_emoji(root: str | os.PathLike, test_per_class: int = TEST_PER_CLASS) -> Path:
    """Unpack the bundled unseen-emoji task (JPEG files, see tools/make_demo_emoji.py) to root/train/ and root/test/."""
    root = Path(root)
    with tarfile.open(EMOJI_TAR) as tar:
        plan = {}
        for member in tar.getmembers():
            parts = PurePosixPath(member.name).parts
            if member.isfile() and _safe_member(member.name) and len(parts) == 4:
                if parts[1] == "train" or int(Path(parts[3]).stem) < test_per_class:
                    plan[root.joinpath(*parts[1:])] = member
        for stale in set(root.rglob("*.jpg")) - set(plan):  # left by another --test split: would leak into it
            stale.unlink()
        for path, member in plan.items():
            if not path.is_file():  # written before (each file is written atomically, so it is complete)
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                with atomic_path(path) as tmp:
                    tmp.write_bytes(data)
    return root


@dataclass(frozen=True)
class DemoTask:
    """One image set of the demo: its folder name, what it shows, and how it is written out."""

    name: str
    title: str
    write: Callable[[Path, int], Path]


DEMO_TASKS: dict[str, DemoTask] = {
    "emoji": DemoTask("emoji", "10 emoji BiT-Mini never saw upstream (new classes, the corpus's kind of picture)",
                      write_emoji),
    "digits": DemoTask("digits", "scikit-learn's 8x8 handwritten digits (a far domain: the corpus has none)",
                       write_digits),
}


def _fine_tunes(jobs: list[Any], processes: int) -> list[dict[str, Any]]:
    if processes == 1:
        return [_fine_tune(c) for c in jobs]
    ctx = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=ctx) as pool:
        return list(pool.map(_fine_tune, jobs))


def hyperrule_note(resolution: tuple[int, int]) -> str:
    """Whether the demo's resolution is the HyperRule's for its small images (160/128), said in a few words."""
    return "the HyperRule's for small images" if tuple(resolution) == (160, 128) else "the HyperRule would use 160/128"


def _print_settings(s: DemoSettings, models: tuple[DemoModel, ...]) -> None:
    print(f"Few-shot transfer: {', '.join(str(k) for k in s.shots)} training images per class, {s.seeds} seeds each; "
          f"{s.steps} steps of batch {s.batch}, images squashed to {s.resolution[0]}x{s.resolution[0]} with random "
          f"{s.resolution[1]}x{s.resolution[1]} crops ({hyperrule_note(s.resolution)}), "
          f"{'with' if s.flip else 'no'} horizontal flips{'' if s.flip else ' (a mirrored digit is another shape)'}.")
    for m in models:
        lr = m.base_lr if m.base_lr is not None else recommended_settings(m.model)["base_lr"]
        note = "" if m.base_lr is not None else ", the model's recommended value"
        print(f"  {m.title}: model {m.model}, base lr {lr:g} at batch 512 (= {lr * s.batch / 512:.4g} at batch "
              f"{s.batch}){note}")


def _report(task: DemoTask, table: dict[str, dict[int, list[float]]], s: DemoSettings, n_test: int,
            models: tuple[DemoModel, ...], out: Path) -> Path | None:
    """Print one task's table and write its plot."""
    print(f"\n{task.title}: top-1 on the {n_test} test images, median over {s.seeds} seeds [min-max]; chance 0.10")
    print(f"  {'model':34s}" + "".join(f"{f'{k}-shot {task.name}':>22s}" for k in s.shots))
    for title, row in table.items():
        cells = "".join(f"{'{:.3f} [{:.3f}-{:.3f}]'.format(*_stats(v)):>22s}" for v in row.values())
        print(f"  {title:34s}{cells}")
    if len(models) == 2:
        gains = "".join(f"{_stats(table[models[0].title][k])[0] - _stats(table[models[1].title][k])[0]:>+22.3f}"
                        for k in s.shots)
        print(f"  {'difference of medians':34s}{gains}")
    series = {title: [(k, *_stats(v)) for k, v in row.items()] for title, row in table.items()}
    return error_bar_plot(out / f"accuracy_vs_shots_{task.name}.png", series,
                          f"{task.name}: top-1 vs examples per class", "examples per class", "top-1", log_x=True,
                          hlines={"chance (10 classes)": 0.1})


def run_demo(out: str | os.PathLike = "bigtransfer-demo", settings: DemoSettings | None = None,
             models: tuple[DemoModel, ...] = DEMO_MODELS, quiet: bool = False) -> list[dict[str, Any]]:
    """Write each task's images, fine-tune every model at every K and seed, print the tables; return the summaries."""
    s = settings or DemoSettings()
    out = Path(out).resolve()
    t0 = time.perf_counter()
    tasks = [DEMO_TASKS[name] for name in dict.fromkeys(s.tasks)]  # a task named twice runs once
    folders, tests = {}, {}
    for task in tasks:
        folders[task.name] = task.write(out / task.name, s.test_per_class)
        n_train, tests[task.name] = (sum(1 for _ in (folders[task.name] / split).rglob("*.*"))
                                     for split in ("train", "test"))
        print(f"Demo data: {task.title}, in {folders[task.name]} (train/: {n_train} images, "
              f"test/: {tests[task.name]} images, 10 classes).")
    _print_settings(s, models)
    jobs = [(t, m, k, FinetuneConfig(
        data=str(folders[t.name]), out=str(out / t.name / m.slug / f"k{k}" / f"seed{seed}"), model=m.model,
        weights=m.weights, examples_per_class=k, seed=seed, steps=s.steps, batch=s.batch, resolution=s.resolution,
        flip=s.flip, workers=s.workers, base_lr=m.base_lr, eval_every=s.steps, quiet=True, silent=True,
        overwrite=True)) for t in tasks for k in s.shots for seed in range(s.seeds) for m in models]
    processes = max(1, min(len(jobs), s.processes or os.cpu_count() or 1))
    print(f"{len(jobs)} fine-tunes, {processes} at a time ...", flush=True)
    summaries = _fine_tunes([c for *_, c in jobs], processes)

    tables = {t.name: {m.title: {k: [] for k in s.shots} for m in models} for t in tasks}
    for (t, m, k, _), r in zip(jobs, summaries, strict=True):
        tables[t.name][m.title][k].append(r["top1"])
    plots = [_report(t, tables[t.name], s, tests[t.name], models, out) for t in tasks]
    results = {"shots": list(s.shots), "seeds": s.seeds, "tasks": {
        t.name: {"title": t.title, "test_images": tests[t.name],
                 "models": {title: {str(k): {"top1": v, "median": _stats(v)[0]} for k, v in row.items()}
                            for title, row in tables[t.name].items()}} for t in tasks}}
    write_text(out / "results.json", json.dumps(results, indent=1))
    wrote = ", ".join([str(out / "results.json"), *(str(p) for p in plots if p)])
    print(f"\nWrote {wrote}; each run (config.json, metrics.jsonl, summary.json, plots, checkpoint:) is in "
          f"{out}/<task>/<model>/k<K>/seed<S>/, e.g. {summaries[-1]['checkpoint']}")
    print(f"Demo finished in {time.perf_counter() - t0:.0f} s. Same on your own images: bigtransfer finetune "
          "--data YOUR_FOLDER --model BiT-M-R50x1 --out RUN")
    return summaries
