"""The settings of the evaluation protocols, each declared once (default + help, `core.settings`): the frozen-feature
probes (linear, k-NN), few-shot and VTAB-1k, and the fine-tuning settings every run of a protocol shares (declared in
FinetuneConfig).

Free of torch on purpose: `bigtransfer evaluate` builds its options from these fields without loading it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..core.settings import setting
from ..core.validate import check_out_folder, check_positive, check_positive_all
from ..engine.precision import UNSCALED_PRECISIONS, check_precision
from ..transfer.config import FinetuneConfig

METHODS = ("linear", "knn")
VAL_FRACTION = 0.2
DEFAULT_K = 10
DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_SEEDS = 5
# The default VTAB sweep: the HyperRule's lr and one step of about 3x either side, at the HyperRule's length.
# The spec fixes no VTAB grid; wider grids are a --sweep-lr / --sweep-steps away.
SWEEP_LRS: tuple[float, ...] = (0.001, 0.003, 0.01)
SEEDS = 3  # final runs per VTAB task: the paper's VTAB-1k numbers are the median of 3
TUNED_TRIALS = 40  # Appendix A's random search: trials per task

# A protocol scores each run once, at its end: evaluating along the way (finetune's default, about 5 times) would
# cost up to 5x the evaluation time and choose nothing. The resume point is still saved every SAVE_EVERY steps.
ONLY_AT_END = 2**31 - 1
SAVE_EVERY = 100


# The FinetuneConfig settings every run of a protocol shares; the protocol sets the others per run.
SHARED_SETTINGS = ("model", "weights", "steps", "batch", "batch_split", "resolution", "precision", "device", "workers",
                   "variant", "base_lr")
# Their fields, defaults and help texts included, as FinetuneConfig declares them: each is written once, there.
_SharedSettings = dataclasses.make_dataclass(
    "_SharedSettings", [(f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
                        for f in dataclasses.fields(FinetuneConfig) if f.name in SHARED_SETTINGS])


@dataclass
class TrainOptions(_SharedSettings):
    """The fine-tuning settings every run of a protocol shares (SHARED_SETTINGS; see FinetuneConfig for each)."""

    def finetune_config(self, data: str | Path, out: str | Path, **settings: Any) -> FinetuneConfig:
        """A silent FinetuneConfig for one run of the protocol; `settings` override these options."""
        fields = dataclasses.asdict(self)
        fields["resolution"] = tuple(self.resolution) if self.resolution is not None else None
        fields.update(eval_every=ONLY_AT_END, save_every=SAVE_EVERY)
        fields.update(settings)
        return FinetuneConfig(data=str(data), out=str(out), silent=True, **fields)

    def normalized(self) -> TrainOptions:
        """A copy with an absolute weights path and a tuple resolution."""
        t = dataclasses.replace(self)
        if t.weights is not None:
            t.weights = str(Path(t.weights).expanduser().resolve())
        if t.resolution is not None:
            t.resolution = (int(t.resolution[0]), int(t.resolution[1]))
        return t


PROTOCOL_OUT_HELP = ("folder for every run, config.json and the results (re-run the command to reuse finished runs; "
                     "locked while in use)")


def _shared_training() -> Any:
    """The `train` field of a protocol that fine-tunes: the TrainOptions its runs share (options of their own)."""
    return field(default_factory=TrainOptions, metadata={"help": "the shared fine-tuning settings", "cli": False})


@dataclass
class FrozenEvalConfig:
    """Every setting of a linear-probe or k-NN evaluation; saved as OUT/config.json."""

    method: str = setting(help="linear or knn", cli=False)
    data: str = setting(help="image folder, train/ + val/ (or test/) folder, CSV/JSONL manifest or .npz; without an "
                             "evaluation split 20%% per class is held out")
    out: str = setting(help="folder for config.json and results.json (locked while in use)")
    model: str | None = setting(None, "model name (see 'bigtransfer models'); optional when --weights is given")
    weights: str | None = setting(None, "checkpoint file (.safetensors, .npz, .pt/.pth/.bin)")
    examples_per_class: int | None = setting(None, "few-shot: K training images per class, chosen by --seed "
                                             "(default: all)", metavar="K")
    seed: int = setting(0, "seed of the K-shot subset and the validation split")
    resolution: int | None = setting(None, "squash-resize images to CROP x CROP (default: what the checkpoint "
                                     "records, else the HyperRule's evaluation crop: 128 for images under 96x96 px, "
                                     "else 480)", kind="resolution")
    k: int = setting(DEFAULT_K, "neighbours that vote (default %(default)s; capped at the training size)")
    precision: str = setting("fp32", "inference precision (default %(default)s)", choices=UNSCALED_PRECISIONS)
    # bigtransfer.deploy.engines.ENGINES (named here: config modules import no torch; a test keeps them equal).
    engine: str = setting("torch", "torch (default); compile: the same model compiled by torch.compile (about a "
                          "minute's compile per image size on a CPU, which needs a C++ compiler); onnxruntime: our ONNX "
                          "export run by onnxruntime, fp32 on the CPU, checked against the eager model on the first "
                          "batch", choices=("torch", "compile", "onnxruntime"))
    batch: int = setting(32, "images per forward pass (default %(default)s)", metavar="N")
    workers: int | None = setting(None, "decoding processes (default: one per core, at most 8)", metavar="N")
    device: str = setting("auto", "auto (default), cpu, cuda, cuda:N or mps")
    cache: str | None = setting(None, "feature cache folder (default: 'features' in the download cache)")
    use_cache: bool = setting(True, "always extract features, store nothing", flag="--no-cache")
    val_fraction: float = setting(VAL_FRACTION, "held out per class for evaluation when the data has no val/ or test/ "
                                  "split", cli=False)
    overwrite: bool = setting(False, "replace the results OUT holds from other settings (refused otherwise)")

    def validate(self) -> None:
        """Raise a UserError for a setting that cannot work."""
        if self.method not in METHODS:
            raise UserError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("examples_per_class", "resolution"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UserError(f"{name.replace('_', '-')} must be a positive integer, got {v}")
        if self.k < 1 or self.batch < 1:
            raise UserError(f"k and batch must be positive, got k={self.k}, batch={self.batch}")
        check_precision(self.precision)
        # Imported here: deploy.engines imports torch, which config modules don't at import time.
        from ..deploy.engines import check_engine

        check_engine(self.engine, self.precision, self.device)


@dataclass
class FewShotConfig:
    """Every setting of a few-shot sweep; saved as OUT/config.json."""

    data: str = setting(help="image folder, train/ + val/ (or test/) folder, CSV/JSONL manifest or .npz; without an "
                             "evaluation split 20%% per class is held out (the same for every seed)")
    out: str = setting(help=PROTOCOL_OUT_HELP, metavar="DIR")
    shots: tuple[int, ...] = setting(DEFAULT_SHOTS, "training images per class (default %(default)s)", metavar="K")
    seeds: int = setting(DEFAULT_SEEDS, "runs per K, each on another subset (default %(default)s)")
    train: TrainOptions = _shared_training()
    split_seed: int = setting(0, "draws the held-out split when the data has none; fixed across seeds", cli=False)
    val_fraction: float = setting(0.2, "share of each class held out for scoring when the data has no val/ or test/ "
                                  "(default %(default)s)")
    overwrite: bool = setting(False, "re-run every run from scratch instead of reusing it")

    def normalized(self) -> FewShotConfig:
        """A checked copy: absolute paths, the shots sorted and without repeats."""
        c = dataclasses.replace(self, train=self.train.normalized())
        shots = list(c.shots) if isinstance(c.shots, Sequence) else [c.shots]
        check_positive_all("shots", shots)
        check_positive("seeds", c.seeds)
        c.shots = tuple(sorted(set(shots)))
        if not Path(c.data).expanduser().exists():
            raise FileNotFoundError(f"{c.data}: no such data folder or file")
        c.data = str(Path(c.data).expanduser().resolve())
        c.out = str(Path(c.out).expanduser().resolve())
        check_out_folder(c.out)
        return c


@dataclass
class VtabConfig:
    """Every setting of a VTAB-1k evaluation; saved as OUT/config.json."""

    root: str = setting(help="VTAB-1k copy: ROOT/<task>/{train800,val200,train800val200,test}, each an image folder "
                             "or a .csv/.jsonl manifest")
    out: str = setting(help=PROTOCOL_OUT_HELP, metavar="DIR")
    tasks: list[str] | None = setting(None, "only these tasks (default: all 19)", metavar="TASK", nargs="+")
    sweep: bool = setting(False, "pick lr and steps per task on train800 -> val200 first (a small grid; see "
                          "--sweep-lr, --sweep-steps)")
    sweep_lrs: tuple[float, ...] = setting(SWEEP_LRS, "sweep lrs at batch 512 (default %(default)s)", metavar="LR",
                                           flag="--sweep-lr")
    sweep_steps: tuple[int, ...] | None = setting(None, "sweep lengths (default: --steps, else the HyperRule's)",
                                                  metavar="S")
    tuned: bool = setting(False, "the paper's Appendix A protocol: per task, a random search on train800 -> val200 "
                          "(lr log-uniform 1e-4..1e-1, steps 500..16000, resolution 64..384, MixUp alpha 0..0.4; "
                          "--steps or --resolution fix that setting instead), the best retrained on all 1000")
    trials: int = setting(TUNED_TRIALS, "random-search trials per task with --tuned (default %(default)s)")
    seeds: int = setting(SEEDS, "final runs per task; the score is their median, as the paper's (default "
                         "%(default)s; 1 is faster)")
    train: TrainOptions = _shared_training()
    overwrite: bool = setting(False, "re-run every run from scratch instead of reusing it")

    def normalized(self) -> VtabConfig:
        """A checked copy with absolute paths."""
        c = dataclasses.replace(self, train=self.train.normalized())
        check_positive("seeds", c.seeds)
        check_positive("trials", c.trials)
        if c.sweep and c.tuned:
            raise UserError("--sweep and --tuned are two ways to pick settings on val200; give one of them")
        c.sweep_lrs = tuple(float(v) for v in c.sweep_lrs)
        if not c.sweep_lrs or any(not v > 0 for v in c.sweep_lrs):
            raise UserError(f"sweep lrs must be positive numbers, got {list(c.sweep_lrs)}")
        if c.sweep_steps is not None:
            c.sweep_steps = tuple(c.sweep_steps)
            check_positive_all("sweep steps", c.sweep_steps)
        c.root = str(Path(c.root).expanduser().resolve())
        c.out = str(Path(c.out).expanduser().resolve())
        check_out_folder(c.out)
        return c
