"""The update and the evaluation pass every training loop shares.

`accumulate_and_step` is one optimizer update over the micro-batches of a global batch (gradient accumulation):
each micro-batch is moved to the device, optionally transformed (`prepare`: MixUp), run forward under the run's
precision (autocast), turned into a loss by the loop's own `loss_fn`, and backpropagated (through the fp16 gradient
scaler when there is one); then the gradients are optionally clipped and the optimizer steps at the given lr.
What differs between loops is passed in, so each loop's loss formula stays its own, bit for bit:

- fine-tuning: `loss_fn` = the micro-batch's summed (MixUp) cross-entropy / the global batch, `divisor` 1;
- pre-training: `loss_fn` = the micro-batch's mean loss, `divisor` = batch_split, `sync` = DDP/FSDP's no-sync on
  all but the last micro-batch;
- distillation: `loss_fn` = KL(teacher || student) of the micro-batch.

`evaluation_pass` runs a model over batches without gradients in eval mode (restoring the mode after) and hands
every batch's logits to the caller's accumulator: fine-tuning's top-1/top-5/confusion (`metrics.Evaluation`),
pre-training's collective loss and precision@1.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..model.kernelcal import RULE, TrainingKernels, in_force
from .device import autocast

Batch = tuple[torch.Tensor, Any]


def accumulate_and_step(model: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
                        micro_batches: Iterable[Batch], loss_fn: Callable[[torch.Tensor, Any], torch.Tensor], *,
                        device: torch.device, precision: str = "fp32", lr: float | None = None,
                        scaler: torch.amp.GradScaler | None = None, divisor: int | None = None,
                        prepare: Callable[[int, torch.Tensor, Any], Batch] | None = None,
                        sync: Callable[[int], contextlib.AbstractContextManager] | None = None,
                        clip_norm: float | None = None,
                        kernels: TrainingKernels | None = None) -> list[tuple[torch.Tensor, int]]:
    """One update; returns each micro-batch's loss (as `loss_fn` gave it, detached) and its number of examples.

    `prepare(q, x, target)` may replace micro-batch q's input and target on the device before the forward pass;
    `sync(q)` is entered around micro-batch q's forward pass; the loss backpropagated is loss / `divisor` when one
    is given; `clip_norm` clips the gradients' global norm (after unscaling them) before the update; `kernels`
    picks each convolution's and GroupNorm's kernel by measurement (`model.kernelcal.TrainingKernels`; none:
    the shape rule and channels-last GroupNorms).
    """
    optimizer.zero_grad(set_to_none=True)
    losses = []
    for q, (x, target) in enumerate(micro_batches):
        x = x.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True) if isinstance(target, torch.Tensor) else target
        if prepare is not None:
            x, target = prepare(q, x, target)
        # Backward inside the choices too: activation checkpointing recomputes the forward pass there.
        with in_force(kernels.for_input(model, x) if kernels is not None else RULE, backward=True):
            with sync(q) if sync is not None else contextlib.nullcontext(), autocast(device, precision):
                loss = loss_fn(model(x), target)
            backward = loss / divisor if divisor is not None else loss
            (scaler.scale(backward) if scaler is not None else backward).backward()
        losses.append((loss.detach(), int(x.shape[0])))
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    if clip_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return losses


@torch.no_grad()
def evaluation_pass(model: torch.nn.Module, batches: Iterable[Batch], consume: Callable[[torch.Tensor, Any], None],
                    *, device: torch.device, precision: str = "fp32",
                    forward: Callable[[torch.nn.Module], Callable[[torch.Tensor], torch.Tensor]] | None = None) -> float:
    """Feed every batch's logits (and its target) to `consume`, in eval mode without gradients; the seconds taken.

    `forward(model)`, called once `model` is in eval mode, gives what runs the batches instead of `model` (e.g. its
    inference form); `model` is the one whose train/eval mode is set and restored.
    """
    was_training = model.training
    model.eval()
    run = forward(model) if forward is not None else model
    start = time.perf_counter()
    try:
        for x, target in batches:
            with autocast(device, precision):
                logits = run(x.to(device, non_blocking=True))
            consume(logits, target)
    finally:
        model.train(was_training)
    return time.perf_counter() - start
