"""Resumable training state: weights, optimizer, step and RNG, written atomically."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_path
from .device import align_optimizer_state, with_own_update_kernel


def rng_state() -> dict[str, Any]:
    """Every random generator's state (Python, NumPy, torch CPU and CUDA)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_run_state(path: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   step: int, scaler: torch.amp.GradScaler | None = None, **extra: Any) -> None:
    """Atomically write everything needed to continue a run exactly where it stopped."""
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "rng": rng_state(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "extra": extra,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_run_state(path: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler | None = None, restore_rng: bool = True) -> tuple[int, dict]:
    """Load a saved run state into model and optimizer; return (step, extra)."""
    p = Path(path)
    try:
        # The payload holds RNG states (tuples, numpy arrays), so full unpickling is needed; only
        # files this library wrote into the run directory are ever loaded here.
        payload = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RuntimeError(f"{p}: cannot read the saved run state ({type(e).__name__}: {e}); "
                           "delete it to start the run afresh") from None
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(with_own_update_kernel(payload["optimizer"], optimizer))
    if isinstance(optimizer, torch.optim.Optimizer):
        align_optimizer_state(optimizer)
    if scaler is not None and payload.get("scaler") is not None:
        scaler.load_state_dict(payload["scaler"])
    if restore_rng:
        set_rng_state(payload["rng"])
    return int(payload["step"]), dict(payload.get("extra") or {})
