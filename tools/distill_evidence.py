"""The evidence table of docs/distillation.md: a fine-tuned teacher, a student on labels, the student distilled.

Two tasks. `digits`: the demo's handwritten digits (its fixed split: 30 test images per class), upscaled from 8x8
to 32x32 so that Inception crops are not cut from 8 pixels: K labelled training images per class (one draw, the same
for every run), and the rest of the training images without labels. `shapes`: the four filled shapes of
tests/shapes.py (random size, position, rotation, colours, on gradient backdrops; 32x32), K labelled per class, 100
test images per class, and 1,000 more without labels. The teacher (a pre-trained model) is fine-tuned on the labelled
images once; then, for each seed, the student architecture is (1) trained on the labels with `finetune`, (2) the
same with MixUp alpha 1 (distillation's augmentation strength, as a control), (3) distilled from the teacher on the
same labelled images (their labels unused), and (4) distilled on every training image (the labelled ones plus the
unlabelled rest). Every student gets the same steps and batch. A Markdown table
goes to stdout and OUT/table.md, every run's summary to OUT/results.json; the speed of teacher and student
(`prepare_for_inference`, one thread) is measured at the end:

    python tools/distill_evidence.py --out /tmp/distill-evidence --shots 10 --seeds 3 --steps 300
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests/shapes.py
from tests.shapes import SHAPES, shape_image  # noqa: E402

from bigtransfer.deploy.inference import load_model
from bigtransfer.deploy.inference_model import prepare_for_inference
from bigtransfer.transfer.config import DistillConfig, FinetuneConfig
from bigtransfer.transfer.demo import write_digits
from bigtransfer.transfer.distill import run_distill
from bigtransfer.transfer.finetune import run_finetune

SIZE = 32  # the digits' side after upscaling


def write_shapes_task(out: Path, shots: int, unlabelled: int = 1000, test: int = 100) -> tuple[Path, Path]:
    """labelled/{train,test}/<shape>/ and pool/ (the labelled images plus `unlabelled` more), 32x32 PNGs."""
    labelled, pool = out / f"shapes-k{shots}", out / "shapes-pool"
    for folder in (labelled, pool):
        shutil.rmtree(folder, ignore_errors=True)
    pool.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", shots), ("test", test)):
        for kind in SHAPES:
            (labelled / split / kind).mkdir(parents=True)
            for i in range(n):
                img = shape_image(kind, rng, size=SIZE)
                img.save(labelled / split / kind / f"{i:03d}.png")
                if split == "train":
                    img.save(pool / f"{kind}-{i:03d}.png")
    for i in range(unlabelled):
        shape_image(SHAPES[int(rng.integers(len(SHAPES)))], rng, size=SIZE).save(pool / f"more-{i:04d}.png")
    return labelled, pool


def write_task(out: Path, shots: int, draw_seed: int = 0) -> tuple[Path, Path]:
    """labelled/{train,test}/<digit>/ (K per class) and pool/ (every training image, no labels), 32x32 PNGs."""
    digits = write_digits(out / "digits8")
    labelled, pool = out / f"labelled-k{shots}", out / "pool"
    for folder in (labelled, pool):
        shutil.rmtree(folder, ignore_errors=True)
    pool.mkdir(parents=True)
    rng = np.random.default_rng(draw_seed)
    for split in ("train", "test"):
        for class_dir in sorted((digits / split).iterdir()):
            files = sorted(class_dir.glob("*.png"))
            chosen = set(rng.choice(len(files), shots, replace=False)) if split == "train" else set(range(len(files)))
            (labelled / split / class_dir.name).mkdir(parents=True)
            for i, f in enumerate(files):
                big = Image.open(f).convert("L").resize((SIZE, SIZE), Image.BILINEAR)
                if i in chosen:
                    big.save(labelled / split / class_dir.name / f.name)
                if split == "train":
                    big.save(pool / f"{class_dir.name}-{f.name}")
    return labelled, pool


def _run(job: tuple[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    kind, config = job
    t = time.perf_counter()
    summary = run_finetune(config) if kind == "finetune" else run_distill(config)
    return {**summary, "seconds": time.perf_counter() - t}


def _images_per_s(checkpoint: str, size: int, batch: int = 64, rounds: int = 5) -> float:
    torch.set_num_threads(1)
    model = prepare_for_inference(load_model(None, checkpoint).eval(), calibrate=False)
    x = torch.rand(batch, 3, size, size)
    with torch.inference_mode():
        model(x)
        best = min(_timed(model, x) for _ in range(rounds))
    return batch / best


def _timed(model: torch.nn.Module, x: torch.Tensor) -> float:
    t = time.perf_counter()
    model(x)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--teacher", default="BiT-Mini-R26x0.5", help="pre-trained model to fine-tune as the teacher")
    p.add_argument("--teacher-weights", help="start the teacher from this checkpoint instead of --teacher's weights")
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--teacher-lr", type=float, default=None, help="base lr (default: the model's recommended one)")
    p.add_argument("--teacher-resolution", type=int, nargs=2, default=[48, 40], metavar=("PRECROP", "CROP"))
    p.add_argument("--student", default="R14x0.5")
    p.add_argument("--student-lr", type=float, default=0.5, help="finetune's base lr for the label-trained student")
    p.add_argument("--distill-lr", type=float, default=0.003, help="distillation's peak lr (Adam)")
    p.add_argument("--task", choices=("digits", "shapes"), default="digits")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300, help="updates of every student")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--processes", type=int, default=2)
    args = p.parse_args()
    labelled, pool = (write_task if args.task == "digits" else write_shapes_task)(args.out, args.shots)
    flip = args.task == "shapes"  # a mirrored digit is another shape; a mirrored shape is the same one
    common = dict(batch=args.batch, workers=0, quiet=True, silent=True, overwrite=True)
    teacher = _run(("finetune", FinetuneConfig(
        data=str(labelled), out=str(args.out / "teacher"), model=args.teacher, weights=args.teacher_weights,
        steps=args.teacher_steps,
        resolution=tuple(args.teacher_resolution), base_lr=args.teacher_lr, flip=flip,
        eval_every=args.teacher_steps, **common)))
    jobs = []
    for seed in range(args.seeds):
        run = dict(seed=seed, steps=args.steps, eval_every=args.steps, **common)
        for name, alpha in (("labels", None), ("labels, MixUp", 1.0)):  # MixUp as strong as distillation's
            jobs.append((name, ("finetune", FinetuneConfig(
                data=str(labelled), out=str(args.out / f"{name.replace(', ', '-')}-s{seed}"), model=args.student,
                base_lr=args.student_lr, resolution=(SIZE + 4, SIZE), flip=flip, mixup_alpha=alpha, **run))))
        for name, data in (("distilled, same images", labelled), ("distilled, + unlabelled", pool)):
            jobs.append((name, ("distill", DistillConfig(
                data=str(data), eval_data=str(labelled), out=str(args.out / f"{name.split()[-1]}-s{seed}"),
                teacher=teacher["checkpoint"], student=args.student, resolution=SIZE,
                teacher_resolution=args.teacher_resolution[1], lr=args.distill_lr, flip=flip, **run))))
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.processes, mp_context=ctx) as ex:
        summaries = list(ex.map(_run, [job for _, job in jobs]))
    write_report(args, labelled, teacher, jobs, summaries)


def write_report(args: argparse.Namespace, labelled: Path, teacher: dict, jobs: list, summaries: list[dict]) -> None:
    """The table (printed, and OUT/table.md) and every run's summary (OUT/results.json)."""
    rows: dict[str, list[float]] = {}
    for (name, _), s in zip(jobs, summaries, strict=True):
        rows.setdefault(name, []).append(s["top1"])
    crop = args.teacher_resolution[1]
    speed = {"teacher": _images_per_s(teacher["checkpoint"], crop),
             "student": _images_per_s(summaries[0]["checkpoint"], SIZE),
             "student_at_teacher_size": _images_per_s(summaries[0]["checkpoint"], crop)}
    n_labelled = len(list((labelled / "train").rglob("*.png")))
    lines = [f"| model | how | test top-1 (median of {args.seeds}) | runs |", "|---|---|---|---|",
             f"| teacher {args.teacher} | fine-tuned on the {n_labelled} labelled images, {args.teacher_steps} "
             f"steps, {args.teacher_resolution[1]} px | {teacher['top1']:.1%} | 1 run |"]
    for name, values in rows.items():
        how = {"labels": "trained on the labels (finetune)",
               "labels, MixUp": "trained on the labels with MixUp alpha 1 (finetune --mixup-alpha 1)"}.get(name, name)
        lines.append(f"| {args.student} | {how}, {args.steps} steps, {SIZE} px | {statistics.median(values):.1%} | "
                     f"{', '.join(f'{v:.1%}' for v in values)} |")
    lines.append(f"\nInference (`prepare_for_inference`, one thread, batch 64, best of 5): teacher "
                 f"{speed['teacher']:.0f} images/s at {crop} px; student {speed['student']:.0f} images/s at {SIZE} "
                 f"px ({speed['student'] / speed['teacher']:.2f}x), {speed['student_at_teacher_size']:.0f} at {crop} "
                 f"px ({speed['student_at_teacher_size'] / speed['teacher']:.2f}x).")
    table = "\n".join(lines)
    print(table)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps({"teacher": teacher, "runs": [
        {"row": name, **s} for (name, _), s in zip(jobs, summaries, strict=True)], "speed": speed}, indent=1,
        default=str))


if __name__ == "__main__":
    main()
