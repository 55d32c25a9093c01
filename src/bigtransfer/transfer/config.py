"""The settings of a fine-tuning run and of the demo, each declared once (default + help, `core.settings`).

Free of torch on purpose: the command line builds its options from these fields, and `bigtransfer --help` must not
wait for torch to load (benchmarks/bench_cli_startup.py). The model registry, which loads torch, is imported inside
the two functions that look a model name up (they run when a run starts, not when options are parsed).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..core.errors import UserError
from ..core.settings import setting
from ..core.validate import check_out_folder, check_positive, check_positive_all
from ..engine.precision import PRECISION_NAMES, check_precision
from .hyperrule import BASE_LR, VARIANTS

if TYPE_CHECKING:  # torch is not loaded to build the command line
    from torch.utils.data import Dataset

EVALS_PER_RUN = 5  # when eval_every is not given
TEST_PER_CLASS = 30  # the demo's fixed test split: 300 images
DEMO_TASK_NAMES = ("emoji", "digits")
EMOJI_VIEWS = (16, 30)  # training and test images per class in the bundled emoji task (tools/make_demo_emoji.py)


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run; saved as RUN/config.json."""

    # In Python also a torch Dataset of (PIL image or image tensor, int label): see run_finetune.
    data: str | Dataset = setting(help="one sub-folder of images per class; or train/ with val/ or test/; or a .csv/.jsonl "
                             "manifest (path,label) or an .npz (images, labels)", metavar="DIR")
    out: str = setting(help="run directory (created; re-run to resume; locked while a run uses it: one process at a "
                            "time)", metavar="RUN")
    model: str = setting("BiT-M-R50x1", "a name from 'bigtransfer models' (released names load their weights) or "
                         "R<depth>x<width> (from scratch unless --weights)", metavar="NAME", required=True)
    weights: str | None = setting(None, "start from this checkpoint (.npz, .safetensors, .pt) instead of the "
                                  "name's own weights", metavar="PATH")
    examples_per_class: int | None = setting(None, "few-shot: K training images per class, a balanced subset chosen "
                                             "by --seed", metavar="K")
    seed: int = setting(0, "picks the K-shot subset, split, data order (default %(default)s)")
    steps: int | None = setting(None, "number of updates (default: the HyperRule's)", metavar="S")
    batch: int = setting(512, "global batch size (default %(default)s)", metavar="B")
    batch_split: int = setting(1, "accumulate each batch over Q micro-batches to save memory (default %(default)s)",
                               metavar="Q")
    resolution: tuple[int, int] | None = setting(
        None, "squash-resize to PRECROP, train on random CROP crops, evaluate at CROP (default: the model's "
        "recommended resolution, else the HyperRule's)", kind="resolution")
    flip: bool = setting(True, "no random horizontal flips (for images whose mirror image is another class, e.g. "
                         "digits)", flag="--no-flip")
    crop: bool = setting(True, "no random crops: squash straight to CROP (for tasks about position or count, "
                         "VTAB's no-crop tasks)", flag="--no-crop")
    precision: str = setting("fp32", "fp32, bf16 or fp16 (autocast; fp16 with a gradient scaler) (default "
                             "%(default)s)", choices=PRECISION_NAMES)
    channels_last: bool = setting(True, "train in the NCHW layout instead of the (faster) channels-last one (same "
                                  "results to 1e-5)", flag="--no-channels-last")
    grad_checkpointing: bool = setting(False, "recompute each unit's activations in backward: about 1/4 of the "
                                       "activation memory, ~20%% slower")
    device: str = setting("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    eval_every: int | None = setting(None, f"evaluate every N steps (default: {EVALS_PER_RUN} times per run; always "
                                     "at the end)", metavar="N")
    save_every: int | None = setting(None, "save the resume state every N steps (default: at each evaluation; always "
                                     "at the end)", metavar="N")
    workers: int | None = setting(None, "data loading processes (default: CPUs, at most 8)", metavar="N")
    eval_batch: int | None = setting(None, "images per evaluation batch (default: the micro-batch size)", cli=False)
    strict: bool = setting(False, "refuse to train if any image is unreadable")
    quiet: bool = setting(False, "plain log lines instead of a progress bar")
    silent: bool = setting(False, "print nothing (for protocols that run many fine-tunes)", cli=False)
    overwrite: bool = setting(False, "discard what RUN holds and start afresh")
    variant: str = setting("release", "HyperRule as in the authors' release (default) or as the paper states it",
                           choices=VARIANTS)
    base_lr: float | None = setting(None, "lr at batch 512, scaled by B/512 (default: the model's recommended value, "
                                    "e.g. BiT-Mini's; else the HyperRule's 0.003)")
    val_fraction: float = setting(0.2, "share of each class held out for evaluation when there is no val/ or test/ "
                                  "(default %(default)s)")
    split_seed: int | None = setting(None, "draws the held-out split; None: --seed (the few-shot protocol fixes it)",
                                     cli=False)
    mixup_alpha: float | None = setting(None, "MixUp Beta(A, A) for this run; 0: off (default: the HyperRule's, 0 "
                                        "under 20k training images, else 0.1)", metavar="A")
    tensorboard: bool = setting(False, "also log to TensorBoard event files in RUN/tensorboard (pip install "
                                "'bigtransfer[tensorboard]')")
    keep_state: bool = setting(False, "keep RUN/state.pt (weights and optimizer, 2-3x the checkpoint's size) after "
                               "the run finished; by default it is removed, and re-running the finished command still "
                               "trains nothing")

    # The settings that may differ when a run is resumed (how it is spread, shown and checked, not what it
    # computes); every other one must equal the saved value (`engine.rundir`'s one rule).
    RESUMABLE_CHANGES: ClassVar[frozenset[str]] = frozenset({
        "out", "batch_split", "channels_last", "grad_checkpointing", "device", "eval_every", "save_every", "workers",
        "eval_batch", "strict", "quiet", "silent", "overwrite", "tensorboard", "keep_state"})

    def normalized(self) -> FinetuneConfig:
        """A copy with absolute paths and a tuple resolution, after checking every value."""
        c = dataclasses.replace(self)
        _apply_model_defaults(c)
        c.validate()
        if is_path(c.data):
            c.data = str(Path(c.data).expanduser().resolve())
        c.out = str(Path(c.out).expanduser().resolve())
        if c.weights is not None:
            c.weights = str(Path(c.weights).expanduser().resolve())
        if c.resolution is not None:
            c.resolution = (int(c.resolution[0]), int(c.resolution[1]))
        return c

    def validate(self) -> None:
        """Raise a UserError (or FileNotFoundError) naming the first setting that cannot work."""
        for name in ("examples_per_class", "steps", "eval_every", "save_every", "eval_batch"):
            check_positive(name.replace("_", "-"), getattr(self, name), allow_none=True)
        check_positive("batch", self.batch)
        check_positive("batch-split", self.batch_split)
        if self.batch % self.batch_split:
            raise UserError(f"batch {self.batch} is not divisible by batch-split {self.batch_split}")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 0):
            raise UserError(f"workers must be 0 or more, got {self.workers!r}")
        check_precision(self.precision)
        if self.variant not in VARIANTS:
            raise UserError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.resolution is not None:
            check_crops(self.resolution)
        if not (isinstance(self.val_fraction, int | float) and 0.0 < self.val_fraction < 1.0):
            raise UserError(f"val-fraction must be between 0 and 1, got {self.val_fraction!r}")
        alpha = self.mixup_alpha
        if alpha is not None and not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha >= 0):
            raise UserError(f"mixup alpha must be 0 or more, got {alpha!r}")
        if not (isinstance(self.base_lr, int | float) and math.isfinite(self.base_lr) and self.base_lr > 0):
            raise UserError(f"base lr must be a positive number, got {self.base_lr!r}")
        if is_path(self.data) and not Path(self.data).expanduser().exists():
            raise FileNotFoundError(f"{self.data}: no such data folder or file")
        if self.weights is not None and not Path(self.weights).expanduser().is_file():
            raise FileNotFoundError(f"{self.weights}: no such weights file")
        check_out_folder(self.out, "a run directory")
        if self.tensorboard:
            _require_tensorboard()  # now, not after the data and the model are loaded
        _model_info(self.model)  # raises a ValueError listing the known names


def is_path(data: Any) -> bool:
    """Whether the data setting is a path (else a torch Dataset given in Python)."""
    return isinstance(data, str | os.PathLike)


def _require_tensorboard() -> None:
    # engine.metrics loads torch: imported when a run asks for TensorBoard, not when the options are built.
    from ..engine.metrics import require_tensorboard

    require_tensorboard()


def _model_info(name: str) -> Any:
    # The registry loads torch: imported when a run starts, not when the command line builds its options.
    from ..model.registry import resolve

    return resolve(name)


def recommended_settings(model: str) -> dict[str, Any]:
    """The fine-tuning settings a model name recommends: "base_lr" always, "resolution" where it has its own.

    Released BiT models recommend nothing of their own, so they keep the HyperRule exactly (base lr 0.003 and its
    resolution rule); a bundled model such as BiT-Mini carries its own (small images) in its file's metadata.
    """
    return {"base_lr": BASE_LR, **_model_info(model).finetune_defaults}


def _apply_model_defaults(c: FinetuneConfig) -> None:
    """Fill the settings left unset (None) from the model's recommended ones."""
    recommended = recommended_settings(c.model)
    if c.base_lr is None:
        c.base_lr = float(recommended["base_lr"])
    if c.resolution is None and recommended.get("resolution"):
        c.resolution = tuple(recommended["resolution"])


def check_crops(resolution: tuple[int, ...]) -> None:
    """Refuse a (PRECROP, CROP) pair that is not two numbers with 1 <= CROP <= PRECROP."""
    if len(resolution) != 2:
        raise UserError(f"resolution must be two numbers PRECROP CROP, got {resolution!r}")
    precrop, crop = resolution
    if not (1 <= crop <= precrop):
        raise UserError(f"resolution needs 1 <= CROP <= PRECROP, got PRECROP {precrop} CROP {crop}")


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs with (small enough for a CPU)."""

    tasks: tuple[str, ...] = setting(DEMO_TASK_NAMES, "image sets: emoji (classes BiT-Mini never saw), digits (a far "
                                     "domain) (default: both)", nargs="+", choices=DEMO_TASK_NAMES)
    shots: tuple[int, ...] = setting((1, 5, 10), "images per class (default %(default)s)", metavar="K", nargs="+")
    seeds: int = setting(3, "runs per K and model (default %(default)s)")
    steps: int = setting(60, "updates per run (default %(default)s)")
    batch: int = setting(32, "batch size (default %(default)s)")
    # The HyperRule would squash these 8x8 images to 160 and crop 128 (3-4x the time on a CPU). BiT-Mini was
    # pre-trained at 48 px and does best near it; training from scratch does best at low resolution too, so the
    # resolution decides the margins (measured in docs/models/BiT-Mini.md, "The seventh session").
    resolution: tuple[int, int] = setting((48, 40), "squash-resize to PRECROP, random crops of CROP (default: 48 40; "
                                          "the HyperRule's for images this small is 160 128, 3-4x slower)",
                                          kind="resolution")
    flip: bool = setting(False, "a mirrored digit is not the same digit", cli=False)
    workers: int = setting(0, "100 tiny PNGs decode faster in-process than worker processes start", cli=False)
    test_per_class: int = setting(TEST_PER_CLASS, "held-out images per class", cli=False)
    processes: int | None = setting(None, "fine-tunes side by side, one thread each (default: one per core)")

    def validate(self) -> None:
        """Raise a UserError naming the first setting that cannot work."""
        for name in ("seeds", "steps", "batch", "processes"):
            check_positive(f"--{name}", getattr(self, name), allow_none=name == "processes")
        check_positive_all("--shots", self.shots)
        check_crops(self.resolution)
        if "emoji" in self.tasks and max(self.shots) > EMOJI_VIEWS[0]:
            raise UserError(f"--shots: the emoji task has {EMOJI_VIEWS[0]} training images per class, "
                            f"got {max(self.shots)}")
        if "emoji" in self.tasks and not 1 <= self.test_per_class <= EMOJI_VIEWS[1]:
            raise UserError(f"test_per_class must be 1 to {EMOJI_VIEWS[1]} with the emoji task, got {self.test_per_class}")


DISTILL_OPTIMIZERS = ("adam", "sgd")
DISTILL_SCHEDULES = ("cosine", "steps")
WARMUP_FRACTION = 0.05  # of a distillation run, when --warmup is not given


@dataclass
class DistillConfig:
    """Every setting of a distillation run (`bigtransfer.transfer.distill`); saved as RUN/config.json."""

    data: str = setting(help="training images: a folder of images without labels, or any labelled source finetune "
                             "reads (labels are then used only to evaluate)", metavar="DIR")
    out: str = setting(help="run directory (created; re-run to resume; locked while a run uses it)", metavar="RUN")
    teacher: str = setting(help="the teacher: a checkpoint file (e.g. RUN/checkpoint.safetensors of a finetune run) "
                                "or a model name with weights", metavar="CKPT|NAME")
    student: str = setting("R50x1", "student architecture R<depth>x<width> (from scratch) or a model name (starts "
                           "from its weights) (default %(default)s)", metavar="NAME")
    student_weights: str | None = setting(None, "start the student from this checkpoint", metavar="PATH")
    new_head: bool = setting(False, "give the student a new zero-initialised head when its starting head has another "
                             "class count")
    eval_data: str | None = setting(None, "labelled images to evaluate the student on (their test/val split, else "
                                    "all of them)", metavar="DIR")
    seed: int = setting(0, "data order, crops, MixUp and the student's initialisation (default %(default)s)")
    steps: int = setting(1000, "number of updates (default %(default)s; the paper's schedules are long)", metavar="S")
    batch: int = setting(512, "global batch size (default %(default)s)", metavar="B")
    batch_split: int = setting(1, "accumulate each batch over Q micro-batches (default %(default)s)", metavar="Q")
    resolution: int = setting(128, "the student's input size: the crop is resized to it (default %(default)s)",
                              metavar="R")
    teacher_resolution: int | None = setting(None, "the teacher's input size: the same crop resized to R (default: "
                                             "the student's)", metavar="R")
    flip: bool = setting(True, "no random horizontal flips", flag="--no-flip")
    mixup_alpha: float = setting(1.0, "MixUp Beta(A, A); 0: off (default %(default)s: every batch is mixed)",
                                 metavar="A")
    temperature: float = setting(1.0, "softmax temperature of both networks in the loss (default %(default)s)",
                                 metavar="T")
    optimizer: str = setting("adam", "adam: AdamW with decoupled decay (the paper's); sgd: BiT's, momentum 0.9 "
                             "(default %(default)s)", choices=DISTILL_OPTIMIZERS)
    lr: float = setting(0.003, "peak learning rate (default %(default)s)")
    weight_decay: float = setting(1e-4, "adam: decoupled, follows the schedule; sgd: L2 (default %(default)s)",
                                  metavar="WD")
    clip_norm: float | None = setting(1.0, "clip the gradient's global norm to N (default %(default)s)", metavar="N")
    schedule: str = setting("cosine", "cosine (the paper's) or steps (BiT's x0.1 at 30/60/90%%) (default "
                            "%(default)s)", choices=DISTILL_SCHEDULES)
    warmup: int | None = setting(None, "linear warm-up steps (default: 5%% of the run)", metavar="S")
    precision: str = setting("fp32", "fp32, bf16 or fp16 (default %(default)s)", choices=PRECISION_NAMES)
    channels_last: bool = setting(True, "train in the NCHW layout instead of the (faster) channels-last one",
                                  flag="--no-channels-last")
    device: str = setting("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    eval_every: int | None = setting(None, f"evaluate every N steps (default: {EVALS_PER_RUN} times per run)",
                                     metavar="N")
    save_every: int | None = setting(None, "save the resume state every N steps (default: at each evaluation)",
                                     metavar="N")
    workers: int | None = setting(None, "data loading processes (default: CPUs, at most 8)", metavar="N")
    eval_batch: int | None = setting(None, "images per evaluation batch (default: the micro-batch size)", cli=False)
    val_fraction: float = setting(0.2, "share of each class held out for evaluation when labelled data has no val/ "
                                  "or test/ (default %(default)s)")
    quiet: bool = setting(False, "plain log lines instead of a progress bar")
    silent: bool = setting(False, "print nothing", cli=False)
    overwrite: bool = setting(False, "discard what RUN holds and start afresh")
    tensorboard: bool = setting(False, "also log to TensorBoard event files in RUN/tensorboard (pip install "
                                "'bigtransfer[tensorboard]')")
    keep_state: bool = setting(False, "keep RUN/state.pt after the run finished; by default it is removed, and "
                               "re-running the finished command still trains nothing")

    # Settings that may differ when a run is resumed (how the work is spread or shown); every other must match.
    RESUMABLE_CHANGES: ClassVar[frozenset[str]] = frozenset({
        "out", "batch_split", "channels_last", "device", "eval_every", "save_every", "workers", "eval_batch", "quiet",
        "silent", "overwrite", "tensorboard", "keep_state"})

    def normalized(self) -> DistillConfig:
        """A copy with absolute paths, after checking every value."""
        c = dataclasses.replace(self)
        c.validate()
        for name in ("data", "out", "student_weights", "eval_data"):
            if getattr(c, name) is not None:
                setattr(c, name, str(Path(getattr(c, name)).expanduser().resolve()))
        if Path(c.teacher).expanduser().is_file():
            c.teacher = str(Path(c.teacher).expanduser().resolve())
        return c

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else round(WARMUP_FRACTION * self.steps)

    def validate(self) -> None:
        """Raise a UserError (or FileNotFoundError) naming the first setting that cannot work."""
        for name in ("steps", "batch", "batch_split", "resolution"):
            check_positive(name.replace("_", "-"), getattr(self, name))
        for name in ("teacher_resolution", "eval_every", "save_every", "eval_batch"):
            check_positive(name.replace("_", "-"), getattr(self, name), allow_none=True)
        if self.batch % self.batch_split:
            raise UserError(f"batch {self.batch} is not divisible by batch-split {self.batch_split}")
        w = self.warmup
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or not 0 <= w < self.steps):
            raise UserError(f"warmup must be a whole number of steps from 0 to steps - 1 ({self.steps - 1}), got {w!r}")
        for name, low, strict in (("lr", 0.0, True), ("temperature", 0.0, True), ("mixup_alpha", 0.0, False),
                                  ("weight_decay", 0.0, False), ("clip_norm", 0.0, True)):
            _check_number(name, getattr(self, name), low, strict, allow_none=name == "clip_norm")
        if not (isinstance(self.val_fraction, int | float) and 0.0 < self.val_fraction < 1.0):
            raise UserError(f"val-fraction must be between 0 and 1, got {self.val_fraction!r}")
        if self.optimizer not in DISTILL_OPTIMIZERS or self.schedule not in DISTILL_SCHEDULES:
            raise UserError(f"optimizer must be one of {', '.join(DISTILL_OPTIMIZERS)} and schedule one of "
                            f"{', '.join(DISTILL_SCHEDULES)}; got {self.optimizer!r}, {self.schedule!r}")
        check_precision(self.precision)
        if self.tensorboard:
            _require_tensorboard()
        for name in ("data", "eval_data"):
            if getattr(self, name) is not None and not Path(getattr(self, name)).expanduser().exists():
                raise FileNotFoundError(f"{getattr(self, name)}: no such data folder or file "
                                        f"(--{name.replace('_', '-')})")
        if self.student_weights is not None and not Path(self.student_weights).expanduser().is_file():
            raise FileNotFoundError(f"{self.student_weights}: no such weights file (--student-weights)")
        check_out_folder(self.out, "a run directory")
        _model_info(self.student)


def _check_number(name: str, value: object, low: float, strict: bool, allow_none: bool = False) -> None:
    """Refuse a value that is not a finite number above `low` (at or above it unless `strict`)."""
    if value is None and allow_none:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (value == low and strict):
        raise UserError(f"{name.replace('_', ' ')} must be a number {'>' if strict else '>='} {low:g}, got {value!r}")
