"""Upstream pre-training (BiT-S / BiT-M / BiT-L recipe) on one process or many (torchrun + torch.distributed).

Recipe (spec section 4): SGD momentum 0.9, lr 0.03 x B / 256, weight decay 1e-4, linear warmup, x0.1 step decays
at the preset's epochs, the loss the labels call for (below), Inception crop + flip, no MixUp.

Length and schedule of a run of T updates at global batch B on n training images:
- T = --steps, or ceil(epochs x n / B) (epochs: --epochs, else the preset's 90 / 90 / 40).
- Decay boundaries: round(T x e / E) for the preset's decay epochs e of its E epochs (bit-s/bit-m: 30, 60, 80 of
  90; bit-l: 10, 23, 30, 37 of 40), so a shorter run decays at the same fractions of its length.
- Warmup: the paper's 5000 updates at batch 4096 are a share of the images seen (17.8% of a BiT-S run), and that
  share is kept at any batch (the linear-scaling reading, spec section 4): 5000 x 4096 / B updates when the run
  sees as many images as the preset's full run (E epochs of its dataset: 28,151 updates at batch 4096 for bit-s,
  311,949 for bit-m, 2,929,688 for bit-l), proportionally fewer for runs that see fewer:
  round(min(5000 x 4096 / B, 5000 x T / T_full)). --warmup-steps overrides it.
- lr(s) is the project's one piecewise rule (`hyperrule`): peak x s / warmup while s < warmup (the first update
  has lr 0), then peak / 10 ** (number of boundaries strictly below s).
- Weight decay 1e-4 on every parameter, GroupNorm scales/offsets and the head bias included: the spec (and the
  paper) give one decay for "the weights" with no exemption; `decay_norm_and_bias=False` exempts the 1-D ones.
  It is PyTorch SGD's coupled L2 (wd x w added to the gradient before momentum), i.e. the gradient of a
  wd/2 x ||w||^2 loss term.
- Loss: "sigmoid" = one binary cross-entropy per class, summed over classes and averaged over examples;
  "softmax" = cross-entropy against the labels spread evenly over an example's classes (plain CE when single-label).
  "auto" (the default) follows the labels: softmax for single-label data, sigmoid for multi-label data, as the
  authors' public configs do. The head starts at zero kernel and zero bias for softmax and bias -10 for sigmoid,
  so the first sigmoid updates do not spend themselves pushing thousands of negative logits down (the label prior).
- Held-out metric: precision@1 (the top-scoring class is one of the example's labels), which is top-1 accuracy
  on single-label data.

Scale-out: every process reads only its slice of each global batch (`pretrain_data.RankStepSampler`), DDP (or
FSDP FULL_SHARD) averages gradients, and only rank 0 writes. The run state is saved unsharded and keyed by
parameter name, so a run resumes on any number of processes and with any batch split: the data stream is a
function of (seed, step) only.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.atomic import write_text
from ..core.errors import UserError, is_user_error
from ..core.runfolder import StopOnSignal
from ..data.loaders import workers_stopped
from ..data.pretraining import eval_batches, load_pretrain_data, train_batches
from ..engine.device import PRECISIONS, sgd, training_layout
from ..engine.metrics import MetricsLog, read_jsonl, to_json
from ..engine.plots import write_plots
from ..engine.progress import Progress
from ..engine.rundir import RunDir, saved_settings
from ..engine.schedule import idle_warning, piecewise_lr
from ..engine.step import accumulate_and_step, evaluation_pass
from ..model.checkpoints import load_state, save_checkpoint
from ..model.factory import create_model
from ..model.kernelcal import TrainingKernels
from ..model.memory import check_training
from ..model.preprocess import data_config
from ..model.registry import resolve
from ..model.resnetv2 import ResNetV2
from . import distributed as dist_utils
from .config import FULL_BATCH, LOSS_SETTINGS, LOSSES, PRESETS, Preset, PretrainConfig  # noqa: F401

SIGMOID_HEAD_BIAS = -10.0  # the initial head bias of sigmoid runs (the authors' configs); softmax runs start at 0
FULL_WARMUP = 5000
FINAL_FILE = "checkpoint.safetensors"


RESUMABLE_CHANGES = PretrainConfig.RESUMABLE_CHANGES


@dataclass(frozen=True)
class Plan:
    """The resolved schedule of a run."""

    steps: int
    batch: int
    resolution: int
    warmup: int
    boundaries: tuple[int, ...]
    peak_lr: float
    examples: int
    eval_every: int
    save_every: int

    def lr(self, step: int) -> float:
        """Learning rate of update `step` (0-based)."""
        return piecewise_lr(step, self.warmup, self.boundaries, self.steps, self.peak_lr) or 0.0

    @property
    def epochs(self) -> float:
        """Passes over the training set."""
        return self.steps * self.batch / self.examples

    def describe(self) -> str:
        """One paragraph for the log."""
        idle = idle_warning(self.warmup, self.steps)
        return (f"{self.steps} updates x batch {self.batch} = {self.epochs:.2f} epochs of {self.examples} images at "
                f"{self.resolution} px; lr {self.peak_lr:.4g}, warmup {self.warmup}, x0.1 after updates "
                f"{', '.join(map(str, self.boundaries))}" + (f"\n{idle}" if idle else ""))


def make_plan(config: PretrainConfig, examples: int) -> Plan:
    """Resolve a config's length, schedule and lr for a training set of `examples` images (see the module doc)."""
    preset = config.preset_info()
    batch = config.batch or preset.batch
    if config.steps is not None:
        steps = config.steps
    else:
        steps = max(1, math.ceil((config.epochs or preset.epochs) * examples / batch))
    boundaries = tuple(int(math.floor(steps * e / preset.epochs + 0.5)) for e in preset.decay_epochs)
    if config.warmup_steps is not None:
        warmup = config.warmup_steps
    else:
        # The same share of images as the full run's warmup: 5000 x 4096 images, fewer when the run sees fewer.
        warmup = int(math.floor(min(FULL_WARMUP * preset.batch / batch, FULL_WARMUP * steps / preset.full_steps)
                                + 0.5))
    peak = config.lr if config.lr is not None else 0.03 * batch / 256
    eval_every = config.eval_every or max(1, steps // 10)
    save_every = config.save_every or max(1, min(1000, steps // 10))
    return Plan(steps, batch, config.resolution or preset.resolution, warmup, boundaries, peak, examples,
                eval_every, save_every)


# ---------------------------------------------------------------- model pieces

def resolve_loss(setting: str, multi_label: bool) -> str:
    """The loss a run trains with: `setting` itself, or for "auto" sigmoid on multi-label data and softmax else."""
    if setting == "auto":
        return "sigmoid" if multi_label else "softmax"
    return setting


def init_head(model: ResNetV2, loss: str) -> None:
    """Zero head kernel; bias 0 for softmax, SIGMOID_HEAD_BIAS for sigmoid (spec section 4)."""
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(SIGMOID_HEAD_BIAS if loss == "sigmoid" else 0.0)


def example_losses(logits: torch.Tensor, targets: torch.Tensor, kind: str = "sigmoid") -> torch.Tensor:
    """Per example: sigmoid cross-entropy summed over classes, or softmax cross-entropy against the labels spread evenly."""
    logits = logits.float()
    if kind == "sigmoid":
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(dim=1)
    if kind == "softmax":
        spread = targets / targets.sum(dim=1, keepdim=True).clamp_min(1.0)
        return -(spread * F.log_softmax(logits, dim=1)).sum(dim=1)
    raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {kind!r}")


def pretrain_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str = "sigmoid") -> torch.Tensor:
    """The training loss: `example_losses` averaged over the batch."""
    return example_losses(logits, targets, kind).mean()


def precision_at_1(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per example: 1.0 when the highest-scoring class is one of its labels, else 0.0 (top-1 when single-label)."""
    return targets.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1).clamp(0, 1)


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict[str, Any]]:
    """SGD parameter groups: one with weight decay on everything, or conv kernels apart from 1-D parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_norm_and_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def initial_model(config: PretrainConfig, classes: list[str], env: dist_utils.DistEnv, say: Callable[[str], None],
                  resumed: dict[str, Any] | None = None) -> ResNetV2:
    """The model a run starts from: random weights, or --init-from's, whose head rows are kept for `classes` it has.

    `resumed`: the "weights" record of the run's config.json when it resumes (the saved state then replaces the
    weights): an --init-from run is rebuilt with the ws_eps and padding it started with, without the source file.
    """
    # Same seed on every rank: FSDP does not broadcast initial weights, and DDP's broadcast then changes nothing.
    # fork_rng leaves the caller's global generator as it was (a new head's construction draws from it too).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.init_from is None:
            model = create_model(config.model, num_classes=len(classes), pretrained=False)
            init_head(model, config.loss)
        elif resumed is not None:  # the saved state replaces every weight: only ws_eps and padding matter
            model = ResNetV2(resolve(config.model).arch, len(classes), ws_eps=float(resumed["ws_eps"]),
                             padding=str(resumed["padding"]))
        else:
            loaded: dict[str, ResNetV2] = {}
            # Rank 0 first, so that a model name is downloaded once; the others then read the cached file.
            _main_first(env, lambda: loaded.update(model=_init_weights(config)))
            model = loaded.get("model") or _init_weights(config)
            if model.labels == classes:
                say(f"weights from {config.init_from}, its head too (the same {len(classes)} classes)")
            else:
                _new_head(model, classes, config.loss, say, str(config.init_from))
    model.labels = list(classes)
    return model


def _new_head(model: ResNetV2, classes: list[str], loss: str, say: Callable[[str], None], source: str) -> None:
    """A head for `classes` that keeps the source's rows of the labels it shares with them (by name); the rest
    start as a random run's do. So a run continued on data with extra classes keeps what its head knew."""
    old_labels = list(model.labels or [])
    old = model.head
    model.reset_head(len(classes), zero_init=True)
    init_head(model, loss)
    where = {name: i for i, name in enumerate(old_labels)}
    shared = [(j, where[c]) for j, c in enumerate(classes) if c in where]
    if shared and old is not None:
        new_rows, old_rows = (torch.tensor(t) for t in zip(*shared, strict=True))
        with torch.no_grad():
            model.head.weight[new_rows] = old.weight[old_rows].to(model.head.weight.dtype)
            model.head.bias[new_rows] = old.bias[old_rows].to(model.head.bias.dtype)
    say(f"weights from {source}; a new head for the data's {len(classes)} classes"
        + (f", {len(shared)} of its rows kept from the source's labels of the same names" if shared else ""))


def _init_weights(config: PretrainConfig) -> ResNetV2:
    """--init-from's model: a file, read as --model (whose architecture it must hold), or a name with weights (whose
    architecture PretrainConfig.validate compared before anything was downloaded)."""
    path = Path(str(config.init_from)).expanduser()
    if path.is_file():
        return create_model(config.model, pretrained=path)
    return create_model(str(config.init_from), pretrained=True)


# ---------------------------------------------------------------- the run

def _main_first(env: dist_utils.DistEnv, fn: Callable[[], Any]) -> Any:
    """fn() on rank 0, its result (or its error) on every rank, so a bad input stops all processes at once."""
    result: tuple[bool, Any] = (True, None)
    error: BaseException | None = None
    if env.is_main:
        try:
            result = (True, fn())
        except Exception as e:
            error = e
            result = (False, (is_user_error(e), str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"))
    ok, value = dist_utils.broadcast_object(result)
    if ok:
        return value
    if error is not None:
        raise error  # rank 0 keeps the original exception and its traceback
    user, message = value
    raise (UserError if user else RuntimeError)(f"rank 0 stopped: {message}")


def _check_warmup(saved: dict[str, Any], config: PretrainConfig, plan: Plan, path: Path) -> None:
    """Refuse to resume under another warm-up length than the run started with (the default rule changed once).

    States written before the warm-up was recorded used min(5000, 5000 x T / T_full) when no --warmup-steps was given.
    """
    before = saved.get("warmup")
    if before is None and config.warmup_steps is None:
        before = min(FULL_WARMUP, int(math.floor(FULL_WARMUP * plan.steps / config.preset_info().full_steps + 0.5)))
    if before is not None and before != plan.warmup:
        raise UserError(f"{path} belongs to a run that warms up for {before} updates; now it would be {plan.warmup} "
                         f"(the default warm-up now keeps the share of images at any batch). Resume with "
                         f"--warmup-steps {before}, or choose another --out")


def evaluate(net: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], env: dist_utils.DistEnv,
             loss_kind: str, precision: str, resolution: int, num_classes: int) -> dict[str, Any]:
    """Held-out loss and precision@1 over every process's share of the held-out set (a collective call)."""
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count

    def lockstep() -> Iterator[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
        # Ranks may hold different numbers of batches, but FSDP needs every rank in every forward, so a rank that
        # has run out feeds a masked dummy image until all have.
        it = iter(batches)
        while dist_utils.any_process((batch := next(it, None)) is not None, env.device):
            if batch is None:
                yield torch.zeros(1, 3, resolution, resolution), (torch.zeros(1, num_classes), torch.zeros(1))
            else:
                yield batch[0], (batch[1], torch.ones(len(batch[0])))

    def add(logits: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor]) -> None:
        nonlocal totals
        (y, mask), logits = target, logits.float().cpu()
        totals += torch.stack([(example_losses(logits, y, loss_kind) * mask).sum(),
                               (precision_at_1(logits, y) * mask).sum(), mask.sum()]).double()

    evaluation_pass(net, lockstep(), add, device=env.device, precision=precision)
    loss_sum, correct, count = dist_utils.all_reduce_sum(totals.to(env.device)).cpu().tolist()
    if count == 0:
        return {}
    return {"eval_loss": loss_sum / count, "eval_precision_at_1": correct / count, "eval_examples": int(count)}


def run_pretrain(config: PretrainConfig, progress: bool = True) -> dict[str, Any]:
    """Pre-train `config.model` on `config.data` into `config.out`; returns the summary (same on every rank)."""
    config.validate()
    # Absolute paths, so a run resumed from another directory (or node) is recognised as the same run.
    config = replace(config, data=str(Path(config.data).expanduser().resolve()),
                     out=str(Path(config.out).expanduser().resolve()))
    env = dist_utils.init_distributed(config.device)
    rundir = RunDir(config.out)
    try:
        with contextlib.ExitStack() as owner:
            def take_folder() -> None:
                owner.enter_context(rundir.lock())

            # Only rank 0 locks the folder: it alone writes there, and the other ranks may run on other nodes.
            _main_first(env, take_folder)
            stop = owner.enter_context(rundir.stop_on_signal(report=env.is_main))
            owner.enter_context(workers_stopped())
            summary = _run(config, rundir, env, progress, stop)
        dist_utils.finish_together()  # only on success: after an error the other ranks may never come
        return summary
    finally:
        dist_utils.cleanup()


def _logged_before(path: Path, steps: int) -> tuple[float | None, float | None, dict[str, Any] | None]:
    """From a resumed run's log: its first and last logged training loss, and its final evaluation if logged."""
    records = read_jsonl(path)
    losses = [r["loss"] for r in records if "loss" in r]
    final = next((r for r in records if "eval_loss" in r and r["step"] == steps), None)
    return (losses[0] if losses else None, losses[-1] if losses else None,
            {k: v for k, v in final.items() if k != "step"} if final else None)


def _run(config: PretrainConfig, rundir: RunDir, env: dist_utils.DistEnv, progress: bool,
         stop: StopOnSignal) -> dict[str, Any]:
    config, data, plan = _data_and_plan(config, env)
    # Only rank 0 shows anything; messages go to standard error, as dist_utils.log's do.
    show = Progress(("bar" if progress else "messages") if env.is_main else "nothing", desc="pre-training",
                    unit="update", stream=sys.stderr)
    resuming = dist_utils.broadcast_object(rundir.has_state())  # rank 0's view of the (shared) run folder decides
    record = _main_first(env, lambda: _weights_record(rundir) if resuming else None)  # an error stops every rank
    run = _Pretraining(config, rundir, env, data, plan, show.say, record)
    if resuming:
        run.resume()
    run.open()
    run.net.train()
    stop.arm()
    show.start(plan.steps, run.start)
    try:
        for step in range(run.start, plan.steps):
            lr = run.update(step)
            done = step + 1
            if done % config.log_every == 0 or done == plan.steps or done == 1:
                mean = run.log_loss(done, lr)
                show.step(done, {"loss": f"{mean:.4f}", "lr": f"{lr:.3g}"})
            else:
                show.step(done)
            if done % plan.eval_every == 0 or done == plan.steps:
                run.last_eval = run.eval_now(done)
            if config.stop_after is not None and config.stop_after <= done < plan.steps:
                run.save_state(done)
                show.close()
                show.say(f"stopped after update {done} of {plan.steps} (--stop-after); the same command continues "
                         "the run")
                return {"steps": plan.steps, "stopped_at": done, "resumed_from": run.start,
                        "world_size": env.world_size, "final_loss": run.last_loss, "first_loss": run.first_loss}
            # Every rank stops at the same update, whichever of them got the signal (a collective call).
            signalled = done < plan.steps and dist_utils.any_process(stop.requested is not None, env.device)
            if (done % plan.save_every == 0 or signalled) and done != plan.steps:
                run.save_state(done)
            if signalled:
                raise stop.stopped(done, plan.steps)
        show.close()
        return run.finish()
    finally:
        show.close()
        if run.logger:
            run.logger.close()


def _weights_record(rundir: RunDir) -> dict[str, Any] | None:
    """The "weights" record (ws_eps, padding) of a run's config.json; None when it has none (an older run)."""
    if not rundir.config_file.is_file():
        return None
    record = saved_settings(rundir.config_file).get("weights")  # a damaged file: an error naming it
    ok = isinstance(record, dict) and isinstance(record.get("ws_eps"), float) and isinstance(record.get("padding"), str)
    return record if ok else None


def _data_and_plan(config: PretrainConfig, env: dist_utils.DistEnv) -> tuple[PretrainConfig, Any, Plan]:
    """The data, the config with its loss resolved, and the plan, refused early when they cannot run here."""
    log = dist_utils.log
    data = _main_first(env, lambda: load_pretrain_data(config.data, config.holdout, config.seed, config.check_images))
    chosen = resolve_loss(config.loss, data.multi_label)
    log(f"loss: {chosen} cross-entropy" + (f" (auto: the data is {'multi' if data.multi_label else 'single'}-label)"
                                           if config.loss == "auto" else ""))
    config = replace(config, loss=chosen)  # saved and compared on resume as the loss actually trained with
    plan = make_plan(config, data.train_count)
    if plan.batch % (env.world_size * config.batch_split):
        raise UserError(f"batch {plan.batch} does not split into {env.world_size} processes x {config.batch_split} "
                         f"micro-batches; choose a batch divisible by {env.world_size * config.batch_split}")
    micro = plan.batch // env.world_size // config.batch_split
    check_training(resolve(config.model).arch, len(data.classes), plan.resolution, micro,
                   what=f"pre-training {config.model}", checkpointing=config.grad_checkpointing,
                   precision=config.precision, shards=env.world_size if config.fsdp else 1, device=env.device)
    log(f"data: {data.summary()}")
    log(f"plan: {plan.describe()}; {env.world_size} process(es) on {env.device.type}"
        f"{' (' + env.backend + ')' if env.backend else ''}, {plan.batch // env.world_size // config.batch_split} "
        f"images per micro-batch, {config.batch_split} micro-batch(es) per update")
    return config, data, plan


class _Pretraining:
    """A pre-training run from its model to its checkpoint, on every process: state, log, updates, evaluations."""

    def __init__(self, config: PretrainConfig, rundir: RunDir, env: dist_utils.DistEnv, data: Any, plan: Plan,
                 say: Callable[[str], None], resumed: dict[str, Any] | None = None) -> None:
        self.config, self.rundir, self.env, self.data, self.plan, self.say = config, rundir, env, data, plan, say
        self.out = rundir.path
        self.state_path = rundir.state_file
        self.micro = plan.batch // env.world_size // config.batch_split
        self.metric_name = "precision@1" if data.multi_label else "top-1"
        model = initial_model(config, list(data.classes), env, say, resumed)
        self.arch, self.ws_eps, self.padding = model.arch, model.ws_eps, model.padding
        model.set_grad_checkpointing(config.grad_checkpointing)  # the same mechanism as fine-tuning's
        model.to(env.device, memory_format=training_layout(env.device, config.channels_last and not config.fsdp))
        if config.fsdp:
            units = [unit for stage in model.stages for unit in stage]
            self.net = dist_utils.wrap_fsdp(model, units, env)
        else:
            self.net = dist_utils.wrap_ddp(model, env)
        self.optimizer = sgd(param_groups(self.net, config.weight_decay, config.decay_norm_and_bias), env.device,
                             fused=not config.fsdp, lr=plan.peak_lr, momentum=config.momentum)
        self.start, self.extra = 0, {}
        self.train_time, self.timed_steps, self.last_eval = 0.0, 0, {}

    def resume(self) -> None:
        """Load RUN/state.pt on rank 0 after checking it belongs to this run; every rank gets its weights."""
        config, plan, path = self.config, self.plan, self.state_path
        holders = dist_utils.StateHolder({}), dist_utils.StateHolder({})

        def read_state() -> tuple[int, dict[str, Any]]:
            # Nothing is drawn from the global generators after initialisation, so their state is not restored.
            step, extra = self.rundir.load_state(model=holders[0], optimizer=holders[1])
            if extra.get("kind") != "pretrain":
                raise UserError(f"{path} was not written by 'bigtransfer pretrain'; choose another --out")
            self.rundir.refuse_changes(extra.get("config", {}), asdict(config), RESUMABLE_CHANGES, where=path,
                                       advice="resume with the same settings (only the number of processes, batch "
                                       "split, FSDP/checkpointing, workers and logging may change) or choose "
                                       "another --out")
            _check_warmup(extra, config, plan, path)
            return step, {"world_size": extra.get("world_size"), "pending_loss": extra.get("pending_loss")}

        self.start, self.extra = _main_first(self.env, read_state)  # only rank 0 reads the file; the weights are broadcast
        dist_utils.load_full_state(self.net, self.optimizer, holders[0].state, holders[1].state)
        self.say(f"resuming {path} at update {self.start} of {plan.steps} (saved by {self.extra['world_size']} "
                       f"process(es), now {self.env.world_size})")

    def open(self) -> None:
        """config.json, the log, what the log held before the start update, and the batches from there on."""
        config, env, plan, out, start = self.config, self.env, self.plan, self.out, self.start
        # Measured kernels for one process only: ranks measuring apart could choose apart, and a resumed rank
        # could choose otherwise than before. Rank 0 keeps the choices (the rule's, for several) in the run folder.
        def open_kernels() -> None:
            self.kernels = TrainingKernels(self.rundir.kernels_file, keep=start > 0, measure=env.world_size == 1,
                                           dtype=PRECISIONS[config.precision])

        self.kernels = TrainingKernels(None, measure=False)  # the other ranks: rank 0's choices, below
        _main_first(env, open_kernels)  # a damaged kernels.json stops every rank
        # A run resumed on more processes: every rank follows the file rank 0 read (the same kernels, the same
        # rounding on every rank); shapes it lacks get the rule everywhere, since several processes never measure.
        plans = dist_utils.broadcast_object(self.kernels.plans if env.is_main else None)
        if not env.is_main:
            self.kernels.plans = plans
        if env.is_main:
            self.rundir.write_config({**asdict(config), "plan": asdict(plan),
                                      "weights": {"ws_eps": self.ws_eps, "padding": self.padding}})
        self.logger = (MetricsLog(out, keep_until_step=start if start else None, tensorboard=config.tensorboard)
                       if env.is_main else None)
        self.first_loss, self.last_loss, self.logged_eval = None, None, None
        if start:
            self.first_loss, self.last_loss, self.logged_eval = dist_utils.broadcast_object(
                _logged_before(out / "metrics.jsonl", plan.steps) if env.is_main else None)
        self.local = torch.zeros(2, dtype=torch.float64)  # loss sum, examples since the last log line (all ranks)
        if start and env.is_main and self.extra.get("pending_loss"):
            self.local += torch.tensor(self.extra["pending_loss"], dtype=torch.float64)
        self.batches = train_batches(self.data, plan.resolution, plan.batch, config.seed, env.rank, env.world_size,
                                     config.batch_split, start, plan.steps, config.workers,
                                     augment=config.augment)

    def update(self, step: int) -> float:
        """One SGD update over this process's micro-batches of `step`; returns its learning rate."""
        config, env, net = self.config, self.env, self.net
        t0 = time.perf_counter()
        lr = self.plan.lr(step)
        micro_batches = (next(self.batches) for _ in range(config.batch_split))
        losses = accumulate_and_step(
            net, self.optimizer, micro_batches, lambda logits, y: pretrain_loss(logits, y, config.loss),
            device=env.device, precision=config.precision, lr=lr, divisor=config.batch_split,
            sync=lambda q: _gradient_sync(net, config, last=q == config.batch_split - 1), kernels=self.kernels)
        for loss, n in losses:
            self.local += torch.stack([loss.double().cpu() * n, torch.tensor(float(n))])
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        if step > self.start:  # the first update of a process pays one-off costs (workers, allocator); not timed
            self.train_time += time.perf_counter() - t0
            self.timed_steps += 1
        return lr

    def images_per_s(self) -> float | None:
        return self.timed_steps * self.plan.batch / self.train_time if self.train_time else None

    def log_loss(self, done: int, lr: float) -> float:
        """Log the mean training loss over every process since the last log line; returns it."""
        loss_sum, count = dist_utils.all_reduce_sum(self.local.to(self.env.device)).cpu().tolist()
        self.local.zero_()
        mean = loss_sum / count
        if not math.isfinite(mean):
            raise UserError(f"the training loss became {mean} at update {done} (lr {lr:.4g}); lower --lr or "
                            "check the data")
        self.first_loss = mean if self.first_loss is None else self.first_loss
        self.last_loss = mean
        ips = self.images_per_s()
        if self.logger:
            self.logger.log({"step": done, "epoch": done * self.plan.batch / self.plan.examples, "lr": lr, "loss": mean,
                             "images_per_s": ips, "images_per_s_per_process": ips / self.env.world_size if ips else None})
        return mean

    def save_state(self, step: int) -> dict[str, torch.Tensor]:
        env = self.env
        model_state, optim_state = dist_utils.gather_full_state(self.net, self.optimizer)  # collective: every rank
        # The loss summed since the last log line goes with the state, so a resumed run logs what an unbroken one would.
        pending = dist_utils.all_reduce_sum(self.local.to(env.device)).cpu().tolist()
        if env.is_main:
            self.rundir.save_state(model=dist_utils.StateHolder(model_state),
                                   optimizer=dist_utils.StateHolder(optim_state), step=step, kind="pretrain",
                                   config=asdict(self.config), world_size=env.world_size, warmup=self.plan.warmup,
                                   pending_loss=pending)
        dist_utils.barrier()
        return model_state

    def eval_now(self, step: int) -> dict[str, Any]:
        config, env, plan = self.config, self.env, self.plan
        held = eval_batches(self.data, plan.resolution, self.micro, env.rank, env.world_size, config.workers,
                            config.max_eval)
        result = evaluate(self.net, held, env, config.loss, config.precision, plan.resolution, len(self.data.classes))
        if result and self.logger:
            self.logger.log({"step": step, **result})
        if result:
            self.say(f"update {step}: held-out loss {result['eval_loss']:.4f}, {self.metric_name} "
                           f"{result['eval_precision_at_1']:.4f} on {result['eval_examples']} images")
        return result

    def finish(self) -> dict[str, Any]:
        """The final evaluation if missing, the state, and on rank 0 the checkpoint, summary.json and plots."""
        config, env, plan, out, data = self.config, self.env, self.plan, self.out, self.data
        if self.start >= plan.steps:  # a finished run again: its final evaluation is in the log unless killed before
            self.last_eval = self.logged_eval if self.logged_eval is not None else self.eval_now(plan.steps)
        model_state = self.save_state(plan.steps)
        summary: dict[str, Any] = {}
        if env.is_main:
            final = ResNetV2(self.arch, len(data.classes), ws_eps=self.ws_eps, padding=self.padding)
            load_state(final, model_state, "the trained model")
            final.labels = list(data.classes)
            final.data_config = data_config(plan.resolution)  # the held-out evaluation squashes to the run's resolution
            save_checkpoint(final, out / FINAL_FILE, pretrain=config.preset, steps=plan.steps, data=str(config.data))
            ips = self.images_per_s()
            summary = {"steps": plan.steps, "resumed_from": self.start, "world_size": env.world_size,
                       "backend": env.backend, "device": env.device.type, "classes": len(data.classes),
                       "multi_label": data.multi_label, "train_examples": data.train_count, "metric": self.metric_name,
                       "loss": config.loss, "first_loss": self.first_loss, "final_loss": self.last_loss,
                       **self.last_eval, "images_per_s": ips,
                       "images_per_s_per_process": ips / env.world_size if ips else None,
                       "timed_updates": self.timed_steps, "checkpoint": str(out / FINAL_FILE), "plan": asdict(plan)}
            write_text(out / "summary.json", to_json(summary, indent=2) + "\n")
            self.logger.close()
            # Chance level is 1/C for single-label data; multi-label precision@1 has none that is independent of the data.
            write_plots(out, read_jsonl(out / "metrics.jsonl"), metric=self.metric_name, lr_title="Learning rate",
                        chance=None if data.multi_label else {"chance": 1.0 / len(data.classes)}, say=self.say)
            self.say(f"wrote {out / FINAL_FILE}; summary in {out / 'summary.json'}")
        dist_utils.barrier()
        return dist_utils.broadcast_object(summary)


def _gradient_sync(net: nn.Module, config: PretrainConfig, last: bool) -> contextlib.AbstractContextManager:
    """All-reduce gradients only on an update's last micro-batch (the others accumulate locally)."""
    if last or config.batch_split == 1:
        if config.fsdp and hasattr(net, "set_requires_gradient_sync"):
            net.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if config.fsdp and hasattr(net, "set_requires_gradient_sync"):
        net.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return net.no_sync() if hasattr(net, "no_sync") else contextlib.nullcontext()
