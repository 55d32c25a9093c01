"""Fine-tune a BiT model on a dataset with the BiT-HyperRule, resumably; `run_finetune(config)` does one run.

The loop (spec section 3): SGD momentum 0.9 without weight decay, lr from the HyperRule plan at every step, a new
zero-initialised head, the global batch accumulated over `batch_split` micro-batches (each micro-batch's summed loss
is divided by the global batch, so the gradient is the full batch's mean), MixUp with one lambda per step shared by
the micro-batches and a partner permutation within each micro-batch. Which examples, crops, flips, lambdas and
permutations step s uses depend on (seed, s) only, so a run killed and re-run with the same command resumes from
RUN/state.pt and ends with the same weights as an uninterrupted run (bit for bit on CPU).

RUN/ holds: config.json (every setting and the resolved plan), metrics.jsonl (one record per step and per
evaluation; "step" counts completed updates) and metrics.csv (the same records), state.pt (resume point),
checkpoint.safetensors (final weights, class names as labels), summary.json, and loss.png, lr.png, accuracy.png,
confusion.png; with tensorboard=True also TensorBoard event files in RUN/tensorboard/.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..core.atomic import write_text
from ..core.errors import UserError
from ..core.paths import name_bytes
from ..core.runfolder import StopOnSignal
from ..core.version import __version__
from ..data.datasets import (
    DataSourceError,
    ImageDataset,
    dataset_splits,
    describe_dataset,
    eval_transform,
    image_size_of,
    load_splits,
    make_loader,
    train_transform,
)
from ..data.loaders import workers_stopped
from ..data.sampling import mix_seed
from ..deploy.inference_model import prepare_for_inference
from ..engine.device import PRECISIONS, describe, grad_scaler, pick_device, sgd, training_layout
from ..engine.metrics import Evaluation, MetricsLog, read_jsonl, to_json
from ..engine.plots import RUN_PLOTS, chance_levels, write_plots
from ..engine.progress import Progress
from ..engine.rundir import KERNELS_FILE, RunDir, RunDirError, must_match
from ..engine.step import accumulate_and_step, evaluation_pass
from ..model.checkpoints import save_checkpoint
from ..model.factory import create_model
from ..model.kernelcal import TrainingKernels
from ..model.memory import check_training
from ..model.preprocess import data_config
from ..model.registry import resolve
from ..model.resnetv2 import ResNetV2
from .config import EVALS_PER_RUN, FinetuneConfig, is_path, recommended_settings  # noqa: F401 - its home before config.py
from .hyperrule import make_plan

# Files a run writes; --overwrite removes exactly these.
RUN_FILES = ("config.json", "metrics.jsonl", "metrics.csv", "state.pt", "summary.json", "checkpoint.safetensors",
             KERNELS_FILE, *RUN_PLOTS)
MOMENTUM = 0.9
ESTIMATE_AFTER = 3  # steps timed (after the first, which pays one-off costs) before the wall-time estimate is printed
HOURS = 3600.0  # an estimate from this many seconds on comes with a warning
PLOT_EVERY_S = 60.0  # redraw the plots at an evaluation at most this often (and always at the end)


# Settings that change what a run computes: resuming under different values would splice two different runs.
SETTINGS_THAT_MATTER = must_match(FinetuneConfig)


# ---------------------------------------------------------------- MixUp and one training step

def mixup_lambda(alpha: float, seed: int, step: int) -> float:
    """The step's MixUp weight: ~ Beta(alpha, alpha) from a generator seeded by (seed, step); 1.0 when alpha is 0."""
    if alpha <= 0:
        return 1.0

    return float(np.random.default_rng(mix_seed("mixup", seed, step)).beta(alpha, alpha))


def mixup_permutation(n: int, seed: int, step: int, micro: int) -> torch.Tensor:
    """The partner of each example of micro-batch `micro` of `step`: a permutation seeded by (seed, step, micro)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed("mixup-perm", seed, step, micro)))


def mixup_loss(logits: torch.Tensor, labels: torch.Tensor, partner_labels: torch.Tensor, lam: float,
               reduction: str = "mean") -> torch.Tensor:
    """lam * CE(logits, labels) + (1 - lam) * CE(logits, partner_labels)."""
    loss = F.cross_entropy(logits, labels, reduction=reduction)
    if lam < 1.0:
        loss = lam * loss + (1.0 - lam) * F.cross_entropy(logits, partner_labels, reduction=reduction)
    return loss


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Iterable[tuple[torch.Tensor,
               torch.Tensor]], *, batch: int, lr: float, lam: float = 1.0, seed: int = 0, step: int = 0,
               device: torch.device | None = None, precision: str = "fp32",
               scaler: torch.amp.GradScaler | None = None, kernels: TrainingKernels | None = None) -> float:
    """One optimizer update over the micro-batches of a global batch of `batch` examples; returns the mean loss."""

    def mix(q: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if lam >= 1.0:
            return x, (y, y)
        perm = mixup_permutation(x.shape[0], seed, step, q).to(x.device)
        return lam * x + (1.0 - lam) * x[perm], (y, y[perm])

    def loss_fn(logits: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # Summed over the micro-batch and divided by the global batch: the accumulated gradient is the batch mean.
        return mixup_loss(logits.float(), *target, lam, reduction="sum") / batch

    losses = accumulate_and_step(model, optimizer, micro_batches, loss_fn, device=device or torch.device("cpu"),
                                 precision=precision, lr=lr, scaler=scaler, prepare=mix, kernels=kernels)
    seen = sum(n for _, n in losses)
    if seen != batch:
        raise RuntimeError(f"step {step}: the micro-batches held {seen} examples, expected {batch}")
    return sum(float(loss) for loss, _ in losses)


def evaluate(model: torch.nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int, *,
             device: torch.device | None = None, precision: str = "fp32") -> dict[str, Any]:
    """Loss, top-1, top-5, per-class accuracy and confusion matrix of a model over a loader."""
    ev = Evaluation(num_classes)
    # fp32: the inference fast path (kernels standardized once for the whole pass, channels-last, the
    # forward-only GEMM rule); reduced precisions keep the training run's own autocast recipe. Not calibrated:
    # a run's logged evaluations must not depend on timings (a resumed run logs what a straight one does).
    fast = precision == "fp32" and isinstance(model, ResNetV2)
    seconds = evaluation_pass(model, loader, ev.update, device=device or torch.device("cpu"), precision=precision,
                              forward=(lambda m: prepare_for_inference(m, calibrate=False)) if fast else None)
    result = ev.result()
    result["seconds"] = seconds
    return result


# ---------------------------------------------------------------- the run directory

def _data_name(c: Any, val: Dataset | None) -> str:
    """The data as config.json records it: the path, or the Datasets' types and sizes."""
    return c.data if is_path(c.data) else describe_dataset(c.data, val)


def _settings(c: Any, val: Dataset | None = None) -> dict[str, Any]:
    """A run config as config.json stores it: tuples as lists, a Dataset as its description."""
    # The Dataset is replaced by its description first: asdict would deep-copy it, and JSON cannot hold it.
    d = dataclasses.asdict(dataclasses.replace(c, data=_data_name(c, val)))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _fingerprint(splits: Any) -> str:
    """A digest of the examples and classes, to refuse resuming on data that changed."""
    h = hashlib.sha256()
    h.update(json.dumps(splits.classes).encode())
    for part in (splits.train, splits.eval):
        for it in part:
            h.update(name_bytes(it.source) + f"\0{it.label}\n".encode())  # the OS's bytes: any file name hashes
        h.update(b"|")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- the run

def _build_model(c: FinetuneConfig, classes: list[str], say: Callable[[str], None]) -> Any:
    """The model with the starting weights and a new zero-initialised head for `classes`."""
    info = resolve(c.model)
    if c.weights is not None:
        model = create_model(c.model, pretrained=c.weights, progress=not (c.quiet or c.silent))
        origin = f"weights from {c.weights}"
    elif info.has_weights:
        model = create_model(c.model, pretrained=True, progress=not (c.quiet or c.silent))
        origin = f"the pre-trained weights of {c.model}"
    else:
        # Seeded, and without touching the caller's global generator, so that the same command gives the same run.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed("init", c.seed))
            model = create_model(c.model, pretrained=False)
        origin = "scratch (random initialisation: no pre-trained weights were given)"
    model.reset_head(len(classes), zero_init=True)
    model.labels = list(classes)
    say(f"model {c.model} ({model.arch.name}) starts from {origin}; new zero-initialised head for {len(classes)} classes")
    return model, origin


def _config_record(settings: dict[str, Any], plan: Any, splits: Any, fingerprint: str,
                   resolved: dict[str, Any]) -> dict[str, Any]:
    """config.json: the settings (what resuming compares), the resolved plan, and the data the run sees."""
    return {
        "settings": settings,
        "plan": {**dataclasses.asdict(plan), "peak_lr": plan.peak_lr, "images_seen": plan.images_seen},
        "resolved": resolved,
        "data": {"classes": splits.classes, "train_examples": len(splits.train), "eval_examples": len(splits.eval),
                 "eval_split": splits.eval_name, **splits.class_counts(),
                 "skipped": [dataclasses.asdict(s) for s in splits.skipped],
                 "ignored": splits.ignored, "fingerprint": fingerprint},
        "versions": {"torch": torch.__version__, "bigtransfer": __version__},
    }


def run_finetune(config: FinetuneConfig, on_step: Callable[[int, dict[str, Any]], None] | None = None, *,
                 val_data: Dataset | None = None) -> dict[str, Any]:
    """Fine-tune as `config` says (resuming RUN/state.pt when present); return the summary also saved as summary.json.

    `config.data` is a path (folder, manifest, .npz) or a map-style `torch.utils.data.Dataset` whose items are
    `(image, label)`: image a PIL image or an image tensor (CHW or HWC or HW; uint8 0-255 or float 0-1, e.g.
    torchvision's ToTensor, but not normalised: BiT's own transforms are applied to the pixels), label an int class
    index. Class names come from the Dataset's `classes` when it has them, labels from its `targets` when it has
    them (else one pass reads every item). `val_data` (a Dataset too) is scored on; without it `val_fraction` of
    each class is held out. With worker processes (`workers`) the Datasets must be picklable. A Dataset run resumes
    only with Datasets of the same types, sizes, labels and classes; anything else is refused, naming what changed.

    `on_step(done, record)` is called after every update (done = updates completed so far) with the step's log
    record; on steps that evaluated, record["eval"] holds the evaluation (as metrics.jsonl logs it: loss, top1,
    top5, per-class accuracy, ...). It runs after any checkpoint of that step was written; an exception it raises
    stops the run as a kill would. RUN is locked for the whole run (`bigtransfer.core.runfolder`); a SIGTERM stops
    it at the next step boundary with the state saved, raising `runfolder.StopRequested`.
    """
    if val_data is not None and is_path(config.data):
        raise UserError("val_data goes with data given as a Dataset; a folder brings its own val/ or test/ split")
    t_start = time.perf_counter()
    c = config.normalized()
    rundir = RunDir(c.out, files=RUN_FILES)
    with rundir.lock(), rundir.stop_on_signal() as stop, workers_stopped():
        return _run(c, rundir, on_step, t_start, stop, val_data)


def _run(c: FinetuneConfig, rundir: RunDir, on_step: Callable[[int, dict[str, Any]], None] | None, t_start: float,
         stop: StopOnSignal, val: Dataset | None) -> dict[str, Any]:
    progress = Progress("nothing" if c.silent else "lines" if c.quiet else "bar", desc="fine-tuning", unit="step")
    settings = _settings(c, val)
    resume, finished = run_status(rundir, c, settings)
    splits, plan = _data_and_plan(c, progress.say, val)
    run = _Training(c, rundir, splits, plan, progress.say, t_start, settings)
    return _drive(run, resume, finished, progress, stop, on_step)


def run_status(rundir: RunDir, c: Any, settings: dict[str, Any]) -> tuple[bool, bool]:
    """(resume from RUN/state.pt, RUN holds this very run finished and without its state) for a run config."""
    may_change = type(c).RESUMABLE_CHANGES
    resume = rundir.resume_point(settings, may_change, overwrite=c.overwrite)
    # A run that finished removed its state.pt (unless keep_state): the same command must not train it again.
    return resume, not resume and not c.overwrite and rundir.finished_without_state(settings, may_change)


def _drive(run: _Training, resume: bool, finished: bool, progress: Progress, stop: StopOnSignal,
           on_step: Callable[[int, dict[str, Any]], None] | None) -> dict[str, Any]:
    """Resume or start a run, train it to its end under the progress display, and finish it; its summary."""
    if finished:
        recorded = json.loads(run.rundir.config_file.read_text()).get("data", {}).get("fingerprint")
        return run.finished(recorded, run.end)
    if resume:
        finished_summary = run.resume()
        if finished_summary is not None:
            return finished_summary
    run.open(resume)
    progress.start(run.end, run.start)
    try:
        stop.arm()
        run.train(progress, stop, on_step)
    finally:
        progress.close()
        run.logger.close()
    return run.finish()


def _data_and_plan(c: FinetuneConfig, say: Callable[[str], None], val: Dataset | None) -> tuple[Any, Any]:
    """The examples and the HyperRule's plan for them (with this run's overrides), each said once."""
    if is_path(c.data):
        splits = load_splits(c.data, val_fraction=c.val_fraction, seed=c.seed, examples_per_class=c.examples_per_class,
                             strict=c.strict, workers=c.workers or 0, progress=not (c.quiet or c.silent),
                             split_seed=c.split_seed)
    else:
        splits = dataset_splits(c.data, val, val_fraction=c.val_fraction, seed=c.seed,
                                examples_per_class=c.examples_per_class, split_seed=c.split_seed)
    say(splits.summary())
    if not splits.eval:
        raise DataSourceError(f"{_data_name(c, val)}: no images left to evaluate on (every class has a single image?)")
    plan = make_plan(len(splits.train), image_size_of(splits), batch=c.batch, steps=c.steps, variant=c.variant,
                     base_lr=c.base_lr, arch=c.model, resolution_override=c.resolution)
    say(plan.describe())
    if c.mixup_alpha is not None:
        plan = dataclasses.replace(plan, mixup_alpha=float(c.mixup_alpha))
        say(f"  mixup alpha set to {c.mixup_alpha:g} for this run (instead of the HyperRule's)")
    if not (c.flip and c.crop):
        off = " and ".join(name for name, on in (("random crops", c.crop), ("horizontal flips", c.flip)) if not on)
        say(f"  augmentation: {off} turned off for this run" + ("" if c.crop else
            f"; training images are squashed straight to {plan.crop}x{plan.crop}"))
    return splits, plan


class _Training:
    """A fine-tuning run from its model to its summary: optimizer, loaders, counters and log, step by step.

    The distillation run (`transfer.distill`) is a subclass: it replaces the set-up, `update` (one optimizer step),
    `open`, `run_eval` and `finish`, and keeps the step loop, resuming, saving and the log as they are here.
    """

    loss_hint = "try a lower --base-lr or fp32"  # what to do when the loss stops being finite

    def __init__(self, c: FinetuneConfig, rundir: RunDir, splits: Any, plan: Any, say: Callable[[str], None],
                 t_start: float, settings: dict[str, Any]) -> None:
        self.c, self.rundir, self.out, self.splits, self.plan = c, rundir, rundir.path, splits, plan
        self.say, self.t_start, self.settings, self.end = say, t_start, settings, plan.end
        self.device = pick_device(c.device)
        self.micro = c.batch // c.batch_split
        check_training(resolve(c.model).arch, len(splits.classes), plan.crop, self.micro,
                       what=f"fine-tuning {c.model}", checkpointing=c.grad_checkpointing, precision=c.precision,
                       device=self.device)
        self.model, self.origin = _build_model(c, splits.classes, say)
        self.model.to(self.device, memory_format=training_layout(self.device, c.channels_last)).train()
        self.model.set_grad_checkpointing(c.grad_checkpointing)
        self.optimizer = sgd(self.model.parameters(), self.device, lr=0.0, momentum=MOMENTUM, weight_decay=0.0)
        self.scaler = grad_scaler(self.device, c.precision)
        self.fingerprint = _fingerprint(splits)
        self.set_cadence(c.eval_every, c.save_every)

    def set_cadence(self, eval_every: int | None, save_every: int | None) -> None:
        """Evaluate (default: EVALS_PER_RUN times a run) and save (default: at each evaluation) every N steps."""
        self.eval_every = eval_every or max(1, self.end // EVALS_PER_RUN)
        self.save_every = save_every or self.eval_every
        self.start, self.extra = 0, {}

    @property
    def eval_examples(self) -> int:
        return len(self.splits.eval)

    def state_extra(self) -> dict[str, Any]:
        """What state.pt records beside the counters, and resuming must find unchanged."""
        return {"fingerprint": self.fingerprint}

    def resume(self) -> dict[str, Any] | None:
        """Load RUN/state.pt; the saved summary when that run had already finished, else None."""
        out, end = self.out, self.end
        self.start, self.extra = self.rundir.load_state(model=self.model, optimizer=self.optimizer, scaler=self.scaler)
        if self.start >= end and (out / "summary.json").is_file():
            return self.finished(self.extra.get("fingerprint"), self.start)
        self._check_data(self.extra.get("fingerprint"))
        changed = [k for k, v in self.state_extra().items() if k != "fingerprint" and self.extra.get(k) != v]
        if changed:
            raise RunDirError(f"{out}: {', '.join(changed)} changed since this run started; pass --overwrite to "
                              "start afresh")
        self.say(f"resuming {out} from step {self.start} of {end}")
        return None

    def _check_data(self, fingerprint: str | None) -> None:
        if fingerprint != self.fingerprint:
            raise RunDirError(f"{self.out}: the data changed since this run started (other examples, labels or classes "
                              f"in {self.settings['data']}); pass --overwrite to start afresh")

    def finished(self, fingerprint: str | None, steps: int) -> dict[str, Any]:
        """The summary of the run in RUN, which already finished with these settings and this data."""
        self._check_data(fingerprint)
        self.say(f"{self.out}: this run already finished ({steps} steps); delete it or pass --overwrite to run it again")
        return json.loads((self.out / "summary.json").read_text())

    def open(self, resume: bool) -> None:
        """config.json, the loaders from the start step, the counters and the log (kept up to the start step)."""
        c, out, plan, splits = self.c, self.out, self.plan, self.splits
        # Created only now, once data, plan and model are good: a run refused before this leaves no empty folder.
        out.mkdir(parents=True, exist_ok=True)
        resolved = {"eval_every": self.eval_every, "save_every": self.save_every, "micro_batch": self.micro,
                    "device": str(self.device), "start": self.origin}
        self.rundir.write_config(_config_record(self.settings, plan, splits, self.fingerprint, resolved))
        train_ds = ImageDataset(splits.train, train_transform(plan.precrop, plan.crop, flip=c.flip, crop_ok=c.crop),
                                splits.opener)
        eval_ds = ImageDataset(splits.eval, eval_transform(plan.crop), splits.opener)
        self.train_loader = make_loader(train_ds, c.batch, shuffle=True, seed=c.seed, workers=c.workers,
                                        start_step=self.start, steps=plan.end, batch_split=c.batch_split)
        self.eval_loader = make_loader(eval_ds, c.eval_batch or self.micro, shuffle=False, workers=c.workers)
        # Measured kernels, in what the run computes in (the GEMM path only for fp32: kernelcal.TrainingKernels).
        self.kernels = TrainingKernels(self.rundir.kernels_file, keep=resume,
                                       dtype=PRECISIONS[c.precision])
        self.open_log(resume)

    def open_log(self, resume: bool) -> None:
        """The counters and the log, as the saved state left them (the log kept up to the start step)."""
        c, out = self.c, self.out
        self.counters = {k: float(self.extra.get(k, 0.0)) for k in ("wall_time_s", "compute_s", "wait_s", "eval_s",
                                                                   "eval_images", "train_images")}
        records = read_jsonl(out / "metrics.jsonl") if resume else []
        self.records = [r for r in records if int(r.get("step", 0)) <= self.start]
        self.last_eval: dict[str, Any] | None = next((r["eval"] for r in reversed(self.records) if "eval" in r), None)
        self.wall_before = self.counters["wall_time_s"]
        self.plotted = time.perf_counter()  # when the plots were last drawn
        self.timed: list[float] = []  # seconds of the steps timed for the wall-time estimate
        self.logger = MetricsLog(out, keep_until_step=self.start if resume else None, tensorboard=c.tensorboard)

    def save(self, step: int) -> None:
        self.counters["wall_time_s"] = self.wall_before + time.perf_counter() - self.t_start
        self.rundir.save_state(model=self.model, optimizer=self.optimizer, step=step, scaler=self.scaler,
                               settings=self.settings, **self.state_extra(), **self.counters)

    def estimate(self, done: int, step_s: float) -> None:
        """After ESTIMATE_AFTER timed steps, say how long the rest of the run should take (and warn if hours)."""
        end, every = self.end, self.eval_every
        if done == self.start + 1 or len(self.timed) >= ESTIMATE_AFTER:  # the first step pays one-off costs
            return
        self.timed.append(step_s)
        if len(self.timed) < ESTIMATE_AFTER or done >= end:
            return
        per_step = sum(self.timed) / len(self.timed)
        evals_left = end // every - done // every + (1 if end % every else 0)
        eval_s = self.eval_examples * per_step / self.c.batch / 3  # forward only: about 1/3 of a training step
        self.say(time_estimate(per_step, end - done, eval_s, evals_left, describe(self.device)))

    def record_eval(self, done: int, result: dict[str, Any], log: bool) -> None:
        """Count an evaluation's time and images; log it (unless `log` is False: already in the log)."""
        self.counters["eval_s"] += result["seconds"]
        self.counters["eval_images"] += result["examples"]
        # The confusions grow with the classes: only the final ones are kept (summary.json, confusion.png).
        record = {"step": done, "eval": {k: v for k, v in result.items() if k not in ("confusion", "top_confusions")}}
        if log:
            self.logger.log(record)
            self.records.append(json.loads(to_json(record)))

    def run_eval(self, done: int, log: bool = True) -> dict[str, Any]:
        c, splits = self.c, self.splits
        result = evaluate(self.model, self.eval_loader, len(splits.classes), device=self.device,
                          precision=c.precision)
        self.record_eval(done, result, log)
        self.say(f"eval at step {done}: {scores(result['top1'], result['top5'], len(splits.classes))}  loss "
                 f"{result['loss']:.4f} ({result['examples']} {splits.eval_name} images)")
        if done == self.end or time.perf_counter() - self.plotted > PLOT_EVERY_S:
            write_plots(self.out, self.records, classes=splits.classes, evaluation=result,
                        chance=chance_levels(len(splits.classes)), lr_title="Learning rate (BiT-HyperRule)",
                        say=self.say)
            self.plotted = time.perf_counter()
        return result

    def update(self, step: int, micro_batches: Iterable[Any]) -> tuple[float, float, dict[str, Any]]:
        """One optimizer update of `step`: (mean loss, lr, further fields of the step's metrics record)."""
        c, plan = self.c, self.plan
        lr, lam = plan.lr(step), mixup_lambda(plan.mixup_alpha, c.seed, step)
        loss = train_step(self.model, self.optimizer, micro_batches, batch=c.batch, lr=lr, lam=lam, seed=c.seed,
                          step=step, device=self.device, precision=c.precision, scaler=self.scaler,
                          kernels=self.kernels)
        return loss, lr, ({"mixup_lambda": lam} if lam < 1.0 else {})

    def train(self, progress: Progress, stop: StopOnSignal,
              on_step: Callable[[int, dict[str, Any]], None] | None) -> None:
        """The steps from the start step to the end: update, log, evaluate and save as the settings say."""
        c, end, counters = self.c, self.end, self.counters
        batches = iter(self.train_loader)
        waited = 0.0

        def micro_batches() -> Iterable[Any]:
            # One at a time, so only one micro-batch is in memory; the time blocked on the loader is input time.
            nonlocal waited
            for _ in range(c.batch_split):
                t = time.perf_counter()
                batch = next(batches)
                waited += time.perf_counter() - t
                yield batch

        for step in range(self.start, end):
            t0, waited = time.perf_counter(), 0.0
            loss, lr, fields = self.update(step, micro_batches())
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # so the compute time below is the GPU's, not the launch queue's
            t1 = time.perf_counter()
            if not math.isfinite(loss) and self.scaler is None:
                raise UserError(f"the training loss became {loss} at step {step}; {self.loss_hint}")
            counters["wait_s"] += waited
            counters["compute_s"] += t1 - t0 - waited
            counters["train_images"] += c.batch
            done = step + 1
            record = {"step": done, "loss": loss, "lr": lr, "images_per_s": c.batch / max(t1 - t0, 1e-9), **fields}
            self.logger.log(record)
            self.records.append(record)
            ips = record["images_per_s"]
            progress.step(done, {"loss": f"{loss:.4f}", "lr": f"{lr:.3g}", "img/s": f"{ips:.1f}"},
                          f"step {done}/{end}  loss {loss:.4f}  lr {lr:.4g}  {ips:.1f} img/s")
            self.estimate(done, t1 - t0)
            evaluated = done % self.eval_every == 0 or done == end
            if evaluated:
                self.last_eval = self.run_eval(done)
            stopping = stop.requested is not None and done < end
            if done % self.save_every == 0 or done == end or stopping:
                self.save(done)
            if on_step is not None:
                on_step(done, {**record, "eval": self.records[-1]["eval"]} if evaluated else dict(record))
            if stopping:
                raise stop.stopped(done, end)
        if self.last_eval is None or self.start >= end:  # a finished run resumed without a summary
            # Its final evaluation is in the log already unless the run was killed before writing it.
            logged = any(r["step"] == end for r in self.records if "eval" in r)
            self.last_eval = self.run_eval(end, log=not logged)
            self.save(end)

    def finish(self) -> dict[str, Any]:
        """The checkpoint (with the evaluation crop as its data config) and summary.json; the summary."""
        c, out, plan, splits = self.c, self.out, self.plan, self.splits
        self.model.cpu()
        self.model.data_config = data_config(plan.crop)  # evaluation squashes to the crop (HyperRule or --resolution)
        save_checkpoint(self.model, out / "checkpoint.safetensors", source="finetune", finetuned_from=c.model,
                        steps=plan.end, top1=self.last_eval["top1"])
        self.counters["wall_time_s"] = self.wall_before + time.perf_counter() - self.t_start
        summary = _summary(c, plan, splits, self.last_eval, self.counters, describe(self.device))
        write_text(out / "summary.json", to_json(summary, indent=2) + "\n")
        if not c.keep_state:  # the run is complete without it (checkpoint + summary), and it weighs 2-3 models
            (out / "state.pt").unlink(missing_ok=True)
        unused = "".join(f"; {k} ({n} images) not used" for k, n in splits.unused.items())
        self.say(f"{scores(summary['top1'], summary['top5'], len(splits.classes))} on {summary['eval_examples']} "
                 f"{splits.eval_name} images{unused} after {plan.end} steps ({summary['wall_time_s']:.1f} s); run in {out}")
        return summary


def scores(top1: float, top5: float | None, num_classes: int) -> str:
    """"top-1 x (chance 1/C), top-5 y": top-5 only above 5 classes, where it can be wrong at all."""
    text = f"top-1 {top1:.4f} (chance {1.0 / num_classes:.4f})"
    return text + (f", top-5 {top5:.4f}" if num_classes > 5 and top5 is not None else "")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / HOURS:.1f} hours"


def time_estimate(step_s: float, steps_left: int, eval_s: float, evals_left: int, device: str) -> str:
    """The line printed after the first steps: the time the rest of the run should take, with a warning from an hour."""
    total = step_s * steps_left + eval_s * evals_left
    text = (f"estimated time to the end: about {_duration(total)} ({step_s:.3g} s per step on {device}; {steps_left} "
            f"step{'s' * (steps_left != 1)} and {evals_left} evaluation{'s' * (evals_left != 1)} to go)")
    if total >= HOURS:
        text = (f"WARNING: {text}. That is hours on this device: fewer --steps, a smaller --batch or --resolution, "
                "or a GPU would shorten it; Ctrl-C keeps what was saved, and the same command continues")
    return text


def _rate(count: float, seconds: float) -> float | None:
    return count / seconds if seconds > 0 else None


def _summary(c: FinetuneConfig, plan: Any, splits: Any, ev: dict[str, Any], k: dict[str, float],
             device: str) -> dict[str, Any]:
    out = Path(c.out)
    per_class = dict(zip(splits.classes, ev["per_class_accuracy"], strict=True))
    return {
        "top1": ev["top1"],
        "top5": ev["top5"] if len(splits.classes) > 5 else None,  # with 5 classes or fewer it is always 1
        "chance_top1": 1.0 / len(splits.classes),
        "loss": ev["loss"],
        "steps": plan.end,
        "examples": len(splits.train),
        "eval_examples": ev["examples"],
        "eval_split": splits.eval_name,
        "unused_splits": splits.unused,  # e.g. {"val": n}: val beside test, left for choosing settings
        "skipped_files": [dataclasses.asdict(s) for s in splits.skipped],
        "ignored_files": splits.ignored,
        "wall_time_s": k["wall_time_s"],
        # Model throughput: images per second of forward + backward + update, not counting waits for data.
        "train_images_per_s": _rate(k["train_images"], k["compute_s"]),
        "eval_images_per_s": _rate(k["eval_images"], k["eval_s"]),
        # Input pipeline: images per second of time the loop spent blocked waiting for batches. Higher than
        # train_images_per_s means data loading was not the bottleneck.
        "input_images_per_s": _rate(k["train_images"], k["wait_s"]),
        "data_wait_fraction": k["wait_s"] / (k["wait_s"] + k["compute_s"]) if k["compute_s"] > 0 else None,
        "images_seen": int(k["train_images"]),
        "model": c.model,
        "classes": splits.classes,
        "per_class_accuracy": per_class,
        "confusion": ev["confusion"],  # None above metrics.CONFUSION_MAX_CLASSES classes
        "top_confusions": ev["top_confusions"],
        "device": device,
        "precision": c.precision,
        "resolution": [plan.precrop, plan.crop],
        "batch": c.batch,
        "base_lr": plan.base_lr,
        "checkpoint": str(out / "checkpoint.safetensors"),
        "plots": [str(out / n) for n in RUN_PLOTS if (out / n).is_file()],  # none without matplotlib
    }
