"""The settings of a pre-training run, each declared once (default + help, `core.settings`), and the paper's presets.

Free of torch on purpose: the command line builds its options from these fields without loading it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..core.errors import UserError
from ..core.settings import setting
from ..core.validate import check_out_folder
from ..engine.precision import UNSCALED_PRECISIONS, check_precision

LOSSES = ("sigmoid", "softmax")
LOSS_SETTINGS = ("auto", *LOSSES)
# "bit": the paper's random-resized crop + flip; the others: then also `data.pretraining.robust_view` with the odds
# of `data.pretraining.ROBUST_AUGMENTS` (named here too, so that this module stays free of torch).
AUGMENTS = ("bit", "robust", "robust-small")
PRECISIONS = UNSCALED_PRECISIONS  # fp16 would need a gradient scaler; bf16 does not
FULL_BATCH = 4096


@dataclass(frozen=True)
class Preset:
    """One of the paper's upstream set-ups: length, decay epochs, batch, resolution, dataset size."""

    name: str
    epochs: int
    decay_epochs: tuple[int, ...]
    dataset_images: int
    batch: int = FULL_BATCH
    resolution: int = 224

    @property
    def full_steps(self) -> int:
        """Updates in the full-scale run (epochs over the preset's dataset at batch 4096)."""
        return math.ceil(self.epochs * self.dataset_images / self.batch)


PRESETS: dict[str, Preset] = {
    "bit-s": Preset("bit-s", 90, (30, 60, 80), 1_281_167),  # ILSVRC-2012 train
    "bit-m": Preset("bit-m", 90, (30, 60, 80), 14_197_122),  # ImageNet-21k (fall 2011 release)
    "bit-l": Preset("bit-l", 40, (10, 23, 30, 37), 300_000_000),  # JFT-300M
}


@dataclass
class PretrainConfig:
    """Everything that defines a pre-training run; saved as RUN/config.json. None = the preset's value."""

    data: str = setting(help="multi-label JSONL manifest ({\"path\":..., \"labels\": [...]}), image folder, CSV/JSONL "
                             "manifest or .npz")
    out: str = setting(help="run folder: config.json, metrics.jsonl, summary.json, plots, state.pt (resumed when "
                            "present), kernels.json (the kernel choices it resumes with), checkpoint.safetensors; "
                            "locked while a run uses it (rank 0 holds OUT/.lock)")
    model: str = setting("R50x1", "model name or architecture, e.g. R50x1 or BiT-M-R50x1 (random init)",
                         required=True)
    init_from: str | None = setting(None, "start from this checkpoint's weights (a path, or a model name with "
                                    "weights) instead of random ones: to continue a pre-training on new data. Its "
                                    "head's rows are kept for the data's classes of the same names; other classes "
                                    "start as a random run's do; a resumed run no longer needs it",
                                    metavar="CKPT|NAME")
    preset: str = setting("bit-m", "upstream recipe: decay epochs, default length, batch 4096, 224 px (default "
                          "%(default)s)", choices=tuple(sorted(PRESETS)))
    epochs: float | None = setting(None, "passes over the training set (default: the preset's 90 or 40)")
    steps: int | None = setting(None, "number of updates instead of --epochs")
    batch: int | None = setting(None, f"global batch over all processes (default {FULL_BATCH}; lr = 0.03 x batch/256)")
    batch_split: int = setting(1, "micro-batches per update on each process (gradient accumulation; exact with "
                               "GroupNorm)", metavar="Q")
    resolution: int | None = setting(None, "training and evaluation size in pixels (default 224)", kind="resolution")
    loss: str = setting("auto", "auto (default): softmax CE for single-label data, sigmoid CE (head bias -10) for "
                        "multi-label; a run saves the resolved one, so resuming compares that", choices=LOSS_SETTINGS)
    warmup_steps: int | None = setting(None, "linear warmup updates (default: the share of images of 5000 at batch "
                                       "4096, i.e. 5000 x 4096 / batch for a full-length run, proportionally fewer "
                                       "for a shorter one)")
    lr: float | None = setting(None, "peak learning rate (default 0.03 x batch / 256)")
    augment: str = setting("bit", "bit (default): the paper's random-resized crop + flip; robust: then also random "
                           "elastic warps, low resolution, greyscale and inversion (for corpora of crisp renders, "
                           "e.g. BiT-Mini's); robust-small: more often and lower, for tiny downstream images",
                           choices=AUGMENTS)
    weight_decay: float = setting(1e-4, "L2 weight decay (default %(default)s, on all weights)")
    decay_norm_and_bias: bool = setting(True, "exempt GroupNorm and bias parameters from decay",
                                        flag="--no-decay-norm-bias")
    momentum: float = setting(0.9, "SGD momentum", cli=False)
    seed: int = setting(0, "seed of weights, data order and augmentation (default %(default)s)")
    holdout: float = setting(0.05, "fraction held out for evaluation when the data has no val/test split (default "
                             "%(default)s)")
    eval_every: int | None = setting(None, "evaluate every N updates (default: 10 times a run)", metavar="N")
    save_every: int | None = setting(None, "save the resumable state every N updates (default: every min(1000, "
                                     "updates / 10))", metavar="N")
    log_every: int = setting(10, "log the training loss every N updates (default %(default)s)", metavar="N")
    fsdp: bool = setting(False, "shard weights, gradients and momentum (FSDP FULL_SHARD)")
    grad_checkpointing: bool = setting(False, "recompute each unit's activations in backward (less memory, ~1/3 "
                                       "more compute)")
    channels_last: bool = setting(True, "train in the NCHW layout instead of the (faster) channels-last one (always "
                                  "NCHW under FSDP, which flattens weights)", flag="--no-channels-last")
    precision: str = setting("fp32", "fp32 (default) or bf16 autocast", choices=PRECISIONS)
    workers: int = setting(2, "image-decoding processes per training process (default %(default)s)")
    device: str = setting("auto", "auto: GPUs when present", choices=("auto", "cuda", "cpu"))
    check_images: bool = setting(False, "decode every image once before training (slow on large sets)")
    max_eval: int | None = setting(None, "evaluate on at most N held-out images", metavar="N")
    stop_after: int | None = setting(None, "end this job after update N with the state saved (for time-limited job "
                                     "slots); rerun to go on", metavar="N")
    tensorboard: bool = setting(False, "also log to TensorBoard event files in OUT/tensorboard (pip install "
                                "'bigtransfer[tensorboard]')")

    # The settings that may differ between a run and its resumption: how the work is spread, not what is computed
    # (`engine.rundir`'s one rule); every other one must equal the value saved in state.pt.
    RESUMABLE_CHANGES: ClassVar[frozenset[str]] = frozenset({
        "batch_split", "fsdp", "grad_checkpointing", "workers", "device", "eval_every", "save_every", "log_every",
        "check_images", "max_eval", "out", "stop_after", "tensorboard"})

    def preset_info(self) -> Preset:
        """The Preset this config names."""
        if self.preset not in PRESETS:
            raise UserError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[self.preset]

    def validate(self) -> None:
        """Raise a UserError naming the first setting that cannot work."""
        self.preset_info()
        if self.epochs is not None and self.steps is not None:
            raise UserError("give --epochs or --steps, not both")
        checks = [("batch", self.batch, 1), ("batch_split", self.batch_split, 1), ("resolution", self.resolution, 32),
                  ("steps", self.steps, 1), ("warmup_steps", self.warmup_steps, 0), ("eval_every", self.eval_every, 1),
                  ("save_every", self.save_every, 1), ("log_every", self.log_every, 1), ("workers", self.workers, 0),
                  ("seed", self.seed, 0), ("max_eval", self.max_eval, 1),
                  ("stop_after", self.stop_after, 1)]
        for name, value, least in checks:
            if value is not None and (not isinstance(value, int) or value < least):
                raise UserError(f"{name} must be an integer >= {least}, got {value!r}")
        if self.epochs is not None and not self.epochs > 0:
            raise UserError(f"epochs must be positive, got {self.epochs}")
        if self.augment not in AUGMENTS:
            raise UserError(f"augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        if self.loss not in LOSS_SETTINGS:
            raise UserError(f"loss must be one of {', '.join(LOSS_SETTINGS)}, got {self.loss!r}")
        check_precision(self.precision, PRECISIONS)
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UserError(f"weight decay must be a finite number >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise UserError(f"momentum must be in [0, 1), got {self.momentum}")
        check_out_folder(self.out, "a run directory")
        if not 0.0 < self.holdout < 1.0:
            raise UserError(f"holdout must be between 0 and 1, got {self.holdout}")

        # The registry loads torch: imported when a run starts, not when the command line builds its options.
        from ..model.registry import resolve

        arch = resolve(self.model).arch  # raises a ValueError listing the known names
        # A run that saved its state resumes without its source (engine.rundir's STATE_FILE; named here, where
        # torch is not imported).
        starting = not (Path(self.out).expanduser() / "state.pt").is_file()
        if self.init_from is not None and starting and not Path(self.init_from).expanduser().is_file():
            try:
                named = resolve(self.init_from)
            except ValueError:
                raise UserError(f"--init-from {self.init_from}: no such file, and not a model name") from None
            if not named.has_weights:
                raise UserError(f"--init-from {self.init_from}: that model has no weights to start from")
            if named.arch != arch:  # before anything is downloaded
                raise UserError(f"--init-from {self.init_from} is an {named.arch.name}, but --model {self.model} is "
                                f"an {arch.name}")
        if self.tensorboard:
            from ..engine.metrics import require_tensorboard  # loads torch, as the registry above does

            require_tensorboard()  # before the data is read, not at the first log line
