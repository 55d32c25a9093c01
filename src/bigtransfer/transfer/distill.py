"""Knowledge distillation as in "Knowledge distillation: A good teacher is patient and consistent" (Beyer et al.,
CVPR 2022; spec section 8); `run_distill(config)` does one run, resumably.

The student learns the teacher's whole function, not labels. Every step, each image gets one Inception crop
(random-resized, 8-100% of the area, aspect 3/4-4/3) and one horizontal flip; MixUp blends it with a partner from
its micro-batch (one lambda ~ Beta(alpha, alpha) per step, one permutation per micro-batch); and the teacher and the
student both see that very view ("consistent teaching"). The loss is KL(softmax(teacher / T) || softmax(student / T))
averaged over the batch, and nothing else. The teacher may look at a higher resolution: the same crop box of the
original image resized to its own size, flipped and mixed the same way. Teacher outputs are never cached: a cached
output belongs to one fixed view, which is what consistent teaching rules out (the paper shows it overfits).
Labels, when the data has them, are used only to evaluate; a folder of images without labels trains as well.

The optimizer follows the authors' public configs: Adam with decoupled weight decay (the decay follows the lr
schedule's shape, not the lr's value: AdamW's coefficient is weight_decay / lr), gradient clipping at global norm
1.0, linear warm-up then cosine decay ("patient": long schedules pay off); BiT's SGD (momentum 0.9) and step schedule
(x0.1 at 30, 60 and 90% of the run) are there for comparison. Every random draw depends on (seed, step) only, so a
run killed and re-run with the same command ends with the same weights as an uninterrupted run (bit for bit on CPU).

RUN/ holds config.json, metrics.jsonl and metrics.csv, state.pt (until the run finished, unless keep_state),
checkpoint.safetensors (the student, with the teacher's class names), summary.json, and loss.png, lr.png,
accuracy.png, confusion.png; with tensorboard=True also TensorBoard event files in RUN/tensorboard/.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ..core.atomic import write_text
from ..core.errors import UserError
from ..core.version import __version__
from ..data.datasets import ImageDataset, Item, eval_transform, load_splits, make_loader
from ..data.images import is_image_path, to_tensor
from ..data.loaders import workers_stopped
from ..data.pretraining import InceptionCrop
from ..data.sampling import mix_seed
from ..deploy.inference import load_model
from ..deploy.inference_model import prepare_for_inference
from ..engine.device import PRECISIONS, autocast, describe, grad_scaler, pick_device, sgd, training_layout
from ..engine.metrics import to_json
from ..engine.plots import RUN_PLOTS, chance_levels, write_plots
from ..engine.progress import Progress
from ..engine.rundir import KERNELS_FILE, RunDir
from ..engine.schedule import cosine_lr, piecewise_lr
from ..engine.step import accumulate_and_step
from ..model.checkpoints import save_checkpoint, weights_digest
from ..model.factory import create_model
from ..model.kernelcal import TrainingKernels
from ..model.memory import check_training
from ..model.preprocess import data_config
from ..model.registry import resolve
from ..model.resnetv2 import ResNetV2
from .config import DistillConfig
from .finetune import (
    _drive,
    _fingerprint,
    _settings,
    _Training,
    evaluate,
    mixup_lambda,
    mixup_permutation,
    run_status,
)

RUN_FILES = ("config.json", "metrics.jsonl", "metrics.csv", "state.pt", "summary.json", "checkpoint.safetensors",
             KERNELS_FILE, *RUN_PLOTS)
STEP_DECAYS = (0.3, 0.6, 0.9)  # BiT's step schedule: x0.1 at these fractions of the run
UNLABELLED = -1  # the label of an image from a folder without class sub-folders


# ---------------------------------------------------------------- the recipe's pieces

@dataclass(frozen=True)
class ConsistentViews:
    """One Inception crop box and flip per image, cut from the original and resized to each network's size.

    Returns the student's view, or (student view, teacher view) when the sizes differ. Draws exactly what
    `InceptionCrop` draws (box, then flip), so the student's view is the pre-training crop of the same generator.
    """

    size: int
    teacher_size: int
    flip: bool = True

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor | tuple:
        box, flipped = InceptionCrop.draw(img.width, img.height, generator)
        region = img.crop(box)
        views = []
        for size in dict.fromkeys((self.size, self.teacher_size)):
            x = to_tensor(region.resize((size, size), Image.BILINEAR))
            views.append(x.flip(2) if flipped and self.flip else x)
        return views[0] if len(views) == 1 else tuple(views)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                 reduction: str = "mean") -> torch.Tensor:
    """KL(p || q) per example, p = softmax(teacher / T), q = softmax(student / T); mean or sum over the batch."""
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    return kl.sum() if reduction == "sum" else kl.mean()


def distill_step(student: torch.nn.Module, teacher: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 micro_batches: Iterable[tuple[Any, torch.Tensor]], *, batch: int, lr: float, lam: float = 1.0,
                 seed: int = 0, step: int = 0, temperature: float = 1.0, clip_norm: float | None = None,
                 device: torch.device | None = None, precision: str = "fp32",
                 scaler: torch.amp.GradScaler | None = None, kernels: TrainingKernels | None = None) -> float:
    """One update over the micro-batches of a global batch (views, labels); returns the mean KL loss.

    The labels are not used. Each micro-batch's views are the student's tensor, or (student's, teacher's) when the
    teacher looks at another resolution; both are mixed with the same lambda and the same partners.
    """
    device = device or torch.device("cpu")

    def views() -> Iterable[tuple[torch.Tensor, Any]]:
        for v, _labels in micro_batches:
            yield (v, None) if isinstance(v, torch.Tensor) else v

    def teach(q: int, x: torch.Tensor, x_teacher: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x_teacher = x_teacher.to(device, non_blocking=True) if x_teacher is not None else None
        if lam < 1.0:
            perm = mixup_permutation(x.shape[0], seed, step, q).to(device)
            x = lam * x + (1.0 - lam) * x[perm]
            x_teacher = lam * x_teacher + (1.0 - lam) * x_teacher[perm] if x_teacher is not None else None
        with torch.no_grad(), autocast(device, precision):
            return x, teacher(x if x_teacher is None else x_teacher)  # the very tensor the student gets, or its twin

    def loss_fn(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        # Summed over the micro-batch and divided by the global batch: the accumulated gradient is the batch mean.
        return distill_loss(student_logits, teacher_logits, temperature, reduction="sum") / batch

    losses = accumulate_and_step(student, optimizer, views(), loss_fn, device=device, precision=precision, lr=lr,
                                 scaler=scaler, prepare=teach, clip_norm=clip_norm, kernels=kernels)
    seen = sum(n for _, n in losses)
    if seen != batch:
        raise RuntimeError(f"step {step}: the micro-batches held {seen} examples, expected {batch}")
    return sum(float(loss) for loss, _ in losses)


def lr_at(c: DistillConfig, step: int) -> float:
    """The peak lr shaped by the schedule at `step` (linear warm-up from 0 first)."""
    if c.schedule == "cosine":
        return cosine_lr(step, c.warmup_steps, c.steps, c.lr)
    boundaries = tuple(round(f * c.steps) for f in STEP_DECAYS)
    return piecewise_lr(step, c.warmup_steps, boundaries, c.steps, c.lr)


def make_optimizer(c: DistillConfig, params: Iterable[torch.nn.Parameter], device: torch.device) -> Any:
    """AdamW with the decay decoupled from the lr's value (coefficient wd / peak lr), or BiT's SGD."""
    if c.optimizer == "sgd":
        return sgd(params, device, lr=0.0, momentum=0.9, weight_decay=c.weight_decay)
    return torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=c.weight_decay / c.lr)


# ---------------------------------------------------------------- data, teacher and student

@dataclass
class DistillData:
    """The images a run distils on and evaluates on; classes None when nothing is labelled."""

    train: list[Item]
    eval: list[Item]
    classes: list[str] | None
    eval_name: str
    summary: str


def _loose_images(folder: Path) -> list[str] | None:
    """The image files of a folder without class sub-folders (unlabelled data), or None for any other source."""
    if not folder.is_dir():
        return None
    entries = [e for e in os.scandir(folder) if not e.name.startswith(".")]
    if any(e.is_dir() for e in entries):
        return None
    return sorted(e.path for e in entries if e.is_file() and is_image_path(e.path)) or None


def load_data(c: DistillConfig) -> DistillData:
    """Training images (labels kept only for evaluation) and the labelled images to evaluate on, if any."""
    loose = _loose_images(Path(c.data))
    if loose is not None:
        train, held, classes, eval_name = [Item(p, UNLABELLED) for p in loose], [], None, "none"
        summary = f"{len(train)} unlabelled images in {c.data}"
    else:
        splits = load_splits(c.data, val_fraction=c.val_fraction, seed=c.seed, workers=c.workers or 0)
        train, held, classes, eval_name = splits.train, splits.eval, splits.classes, splits.eval_name
        summary = splits.summary() + " Labels serve only to evaluate; the student learns from the teacher."
    if c.eval_data is not None:
        ev = load_splits(c.eval_data, val_fraction=c.val_fraction, seed=c.seed, workers=c.workers or 0)
        # An explicit test/val split is the evaluation set; a source without one is evaluated on all of it.
        held = ev.eval if ev.eval_name != "split" else sorted(ev.train + ev.eval, key=lambda i: (i.label, i.source))
        classes, eval_name = ev.classes, f"{ev.eval_name} of {c.eval_data}"
        summary += f"; evaluation on {len(held)} labelled images ({eval_name})"
    return DistillData(train, held, classes, eval_name, summary)


def load_teacher(c: DistillConfig) -> ResNetV2:
    """The teacher: a checkpoint file, or a model name with weights (random weights are refused)."""
    path = Path(c.teacher).expanduser()
    return load_model(None, path) if path.is_file() else load_model(c.teacher, None)


def check_classes(teacher: ResNetV2, data: DistillData) -> None:
    """Refuse labels that cannot be read against the teacher's outputs (another count, or other class names)."""
    if data.classes is None:
        return
    if len(data.classes) != teacher.num_classes:
        raise UserError(f"the teacher predicts {teacher.num_classes} classes but the labelled data has "
                        f"{len(data.classes)}; evaluation needs the teacher's classes")
    if teacher.labels is not None and list(teacher.labels) != list(data.classes):
        diff = [f"{i}: teacher {a!r}, data {b!r}" for i, (a, b) in enumerate(zip(teacher.labels, data.classes,
                                                                             strict=True)) if a != b]
        raise UserError(f"the teacher's classes are not the data's, in the same order ({'; '.join(diff[:5])})")


def build_student(c: DistillConfig, classes: int, say: Callable[[str], None]) -> tuple[ResNetV2, str]:
    """The student with the teacher's class count: from its weights (if any) or seeded random ones."""
    info = resolve(c.student)
    if c.student_weights is not None or info.has_weights:
        model = create_model(c.student, pretrained=c.student_weights or True, progress=not (c.quiet or c.silent))
        origin = f"weights from {c.student_weights}" if c.student_weights else f"the weights of {c.student}"
        if model.num_classes != classes:
            if not c.new_head:
                raise UserError(f"the student's starting weights ({origin}) have a {model.num_classes}-class head but "
                                f"the teacher predicts {classes} classes; pass --new-head to give the student a new "
                                "zero-initialised head")
            model.reset_head(classes, zero_init=True)
            origin += ", new zero-initialised head"
    else:
        with torch.random.fork_rng(devices=[]):  # the same command gives the same student, whatever ran before
            torch.manual_seed(mix_seed("init", c.seed))
            model = create_model(c.student, num_classes=classes, pretrained=False)
        origin = "scratch (random initialisation)"
    say(f"student {c.student} ({model.arch.name}, {classes} classes) starts from {origin}")
    return model, origin


# ---------------------------------------------------------------- the run

def run_distill(config: DistillConfig, on_step: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Distil as `config` says (resuming RUN/state.pt when present); return the summary also saved as summary.json.

    `on_step(done, record)` is called after every update, after any save of that step; an exception it raises
    stops the run as a kill would. RUN is locked for the run; a SIGTERM stops it at the next step boundary with the
    state saved (`bigtransfer.engine.rundir`).
    """
    t_start = time.perf_counter()
    c = config.normalized()
    rundir = RunDir(c.out, files=RUN_FILES)
    with rundir.lock(), rundir.stop_on_signal() as stop, workers_stopped():
        progress = Progress("nothing" if c.silent else "lines" if c.quiet else "bar", desc="distilling", unit="step")
        settings = _settings(c)
        resume, finished = run_status(rundir, c, settings)
        run = _Distillation(c, rundir, progress.say, t_start, settings)
        return _drive(run, resume, finished, progress, stop, on_step)


class _Distillation(_Training):
    """A distillation run: fine-tuning's step loop, resume and saves, with the student as the model being trained."""

    loss_hint = "try a lower --lr or fp32"

    def __init__(self, c: DistillConfig, rundir: RunDir, say: Callable[[str], None], t_start: float,
                 settings: dict[str, Any]) -> None:
        self.c, self.rundir, self.out, self.say, self.t_start, self.end = c, rundir, rundir.path, say, t_start, c.steps
        self.settings = settings
        self.data = load_data(c)
        say(self.data.summary)
        self.device = pick_device(c.device)
        teacher = load_teacher(c)
        check_classes(teacher, self.data)
        self.classes, self.labels = teacher.num_classes, teacher.labels or self.data.classes
        self.micro = c.batch // c.batch_split
        self.teacher_size = c.teacher_resolution or c.resolution
        check_training(resolve(c.student).arch, self.classes, c.resolution, self.micro,
                       what=f"distilling into {c.student}", precision=c.precision, device=self.device)
        self.model, self.origin = build_student(c, self.classes, say)
        self.model.to(self.device, memory_format=training_layout(self.device, c.channels_last)).train()
        # The teacher is frozen: its fast inference form (kernels standardized once) computes the same function.
        # Not calibrated: kernels chosen by timings could differ between a run and its resumption.
        self.teacher_arch = teacher.arch.name
        self.teacher_sha256 = weights_digest(teacher)  # before the inference form: resuming must find these weights
        self.teacher = (prepare_for_inference(teacher.to(self.device).eval(), calibrate=False)
                        if c.precision == "fp32" else teacher.to(self.device).eval())
        say(f"teacher {c.teacher} ({teacher.arch.name}, {self.classes} classes) at {self.teacher_size} px; student "
            f"at {c.resolution} px; KL at temperature {c.temperature:g}, MixUp alpha {c.mixup_alpha:g}, "
            f"{c.optimizer} lr {c.lr:g} ({c.schedule}, {c.warmup_steps} warm-up steps), {c.steps} steps of {c.batch}")
        self.optimizer = make_optimizer(c, self.model.parameters(), self.device)
        self.scaler = grad_scaler(self.device, c.precision)
        self.fingerprint = _fingerprint(self.data)
        self.set_cadence(c.eval_every, c.save_every)

    @property
    def eval_examples(self) -> int:
        return len(self.data.eval)

    def state_extra(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "teacher_sha256": self.teacher_sha256}

    def open(self, resume: bool) -> None:
        """config.json, the loaders from the start step, the counters and the log (kept up to the start step)."""
        c = self.c
        resolved = {"warmup": c.warmup_steps, "teacher_resolution": self.teacher_size, "eval_every": self.eval_every,
                    "save_every": self.save_every, "micro_batch": self.micro, "device": str(self.device),
                    "student_start": self.origin, "teacher_arch": self.teacher_arch,
                    "teacher_sha256": self.teacher_sha256, "teacher_outputs_cached": False}
        self.rundir.write_config({  # only now, once data and models are good
            "settings": self.settings, "resolved": resolved,
            "data": {"classes": self.data.classes, "train_examples": len(self.data.train),
                     "eval_examples": len(self.data.eval), "eval_split": self.data.eval_name,
                     "fingerprint": self.fingerprint},
            "versions": {"torch": torch.__version__, "bigtransfer": __version__}})
        train_ds = ImageDataset(self.data.train, ConsistentViews(c.resolution, self.teacher_size, c.flip))
        self.train_loader = make_loader(train_ds, c.batch, shuffle=True, seed=c.seed, workers=c.workers,
                                        start_step=self.start, steps=c.steps, batch_split=c.batch_split)
        self.eval_loader = (make_loader(ImageDataset(self.data.eval, eval_transform(c.resolution)),
                                        c.eval_batch or self.micro, shuffle=False, workers=c.workers)
                            if self.data.eval else None)
        # Measured kernels, in what the run computes in (the GEMM path only for fp32: kernelcal.TrainingKernels).
        self.kernels = TrainingKernels(self.rundir.kernels_file, keep=resume,
                                       dtype=PRECISIONS[c.precision])
        self.open_log(resume)

    def update(self, step: int, micro_batches: Iterable[Any]) -> tuple[float, float, dict[str, Any]]:
        c = self.c
        lr, lam = lr_at(c, step), mixup_lambda(c.mixup_alpha, c.seed, step)
        loss = distill_step(self.model, self.teacher, self.optimizer, micro_batches, batch=c.batch, lr=lr, lam=lam,
                            seed=c.seed, step=step, temperature=c.temperature, clip_norm=c.clip_norm,
                            device=self.device, precision=c.precision, scaler=self.scaler, kernels=self.kernels)
        return loss, lr, {"mixup_lambda": lam}

    def run_eval(self, done: int, log: bool = True) -> dict[str, Any] | None:
        """The student's accuracy on the labelled evaluation images (None without labels)."""
        if self.eval_loader is None:
            return None
        result = evaluate(self.model, self.eval_loader, self.classes, device=self.device, precision=self.c.precision)
        self.record_eval(done, result, log)
        self.say(f"eval at step {done}: student top-1 {result['top1']:.4f}, loss {result['loss']:.4f} "
                 f"({result['examples']} images)")
        return result

    def finish(self) -> dict[str, Any]:
        """The student's checkpoint (teacher's class names, the student's resolution), summary.json, the plots."""
        c, out = self.c, self.out
        self.model.cpu()
        self.model.labels = list(self.labels) if self.labels else None
        self.model.data_config = data_config(c.resolution)
        ev = self.last_eval or {}
        save_checkpoint(self.model, out / "checkpoint.safetensors", source="distill", distilled_from=c.teacher,
                        steps=c.steps, top1=ev.get("top1"))
        self.counters["wall_time_s"] = self.wall_before + time.perf_counter() - self.t_start
        summary = {"top1": ev.get("top1"), "top5": ev.get("top5"), "eval_loss": ev.get("loss"),
                   "eval_examples": ev.get("examples", 0), "eval_split": self.data.eval_name, "steps": c.steps,
                   "train_examples": len(self.data.train), "student": c.student, "teacher": c.teacher,
                   "resolution": c.resolution, "teacher_resolution": self.teacher_size,
                   "final_loss": next((r["loss"] for r in reversed(self.records) if "loss" in r), None),
                   "wall_time_s": self.counters["wall_time_s"],
                   "train_images_per_s": (self.counters["train_images"] / self.counters["compute_s"]
                                          if self.counters["compute_s"] > 0 else None),
                   "device": describe(self.device), "precision": c.precision,
                   "checkpoint": str(out / "checkpoint.safetensors")}
        write_text(out / "summary.json", to_json(summary, indent=2) + "\n")
        if not c.keep_state:  # complete without it (checkpoint + summary); re-running the command trains nothing
            (out / "state.pt").unlink(missing_ok=True)
        write_plots(out, self.records, classes=self.data.classes, evaluation=self.last_eval,
                    chance=chance_levels(self.classes) if self.data.classes else None,
                    lr_title=f"Learning rate ({c.schedule})", loss_label="KL(teacher || student)", say=self.say)
        top1 = "no labelled images to evaluate on" if ev.get("top1") is None else f"student top-1 {ev['top1']:.4f}"
        self.say(f"{top1} after {c.steps} steps ({summary['wall_time_s']:.1f} s); run in {out}")
        return json.loads(to_json(summary))
