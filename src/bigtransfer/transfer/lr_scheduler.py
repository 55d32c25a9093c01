"""The BiT-HyperRule as a `torch.optim.lr_scheduler`, for training loops of your own."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LRScheduler

from ..core.errors import UserError
from .hyperrule import Plan


class HyperRuleLR(LRScheduler):
    """Sets every parameter group's lr to `plan.lr(step)`: warmup, then x0.1 at each decay boundary.

    Use it as any scheduler: `optimizer.step()` then `scheduler.step()` once per update. Before the first
    update the lr is `plan.lr(0)` (0 in the release variant: its first update changes nothing); after
    `plan.end` updates the schedule is over and the lr stays at its last value (`plan.lr(plan.end - 1)`).
    The optimizer's own lr is ignored: the plan's peak lr (base lr x batch / 512) decides.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, plan: Plan, last_epoch: int = -1) -> None:
        if not isinstance(plan, Plan):
            raise TypeError(f"HyperRuleLR needs a hyperrule.Plan (bigtransfer.make_plan(...)), got {plan!r}")
        if plan.end < 1:
            raise UserError(f"the plan has no updates (end {plan.end})")
        self.plan = plan
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """The plan's lr for the update about to be made, in every group."""
        step = min(max(self.last_epoch, 0), self.plan.end - 1)
        return [float(self.plan.lr(step))] * len(self.optimizer.param_groups)
