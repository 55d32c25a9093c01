"""Resumable training state: weights, optimizer, step and RNG, written atomically.

A run folder may come from anywhere (copied, downloaded, shared), so its state.pt is read with torch's restricted
unpickler (`weights_only=True`): the payload holds only tensors and plain Python values. Files written before
that rule kept NumPy's RNG state as an ndarray; exactly the NumPy globals that rebuild a plain array are allowed
for the load, so those runs still resume.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.atomic import atomic_path
from ..core.errors import UserError
from .device import align_optimizer_state, with_own_update_kernel


def _numpy_array_globals() -> list[Any]:
    """What pickle needs to rebuild a NumPy array of a plain dtype: nothing that can run other code."""
    reconstruct = np.empty(0).__reduce__()[0]  # numpy._core.multiarray._reconstruct (numpy.core before NumPy 2)
    # A file pickled under another NumPy major version names the same function by the other module.
    names = [f"numpy.{m}.multiarray._reconstruct" for m in ("_core", "core")]
    # The dtype's class is needed to set the dtype's state; MT19937's key, the only array saved, is uint32.
    return [(reconstruct, name) for name in names] + [np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def rng_state() -> dict[str, Any]:
    """Every random generator's state (Python, NumPy, torch CPU and CUDA), as tensors and plain values."""
    version, internal, gauss_next = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


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


def _structure_problem(payload: Any) -> str | None:
    """What is wrong with a loaded payload's shape, or None when it has what load_run_state uses."""
    if not isinstance(payload, dict):
        return f"holds a {type(payload).__name__}, not a run state"
    missing = [k for k in ("model", "optimizer", "step", "rng") if k not in payload]
    if missing:
        return f"missing {', '.join(missing)}"
    model, optimizer, step = payload["model"], payload["optimizer"], payload["step"]
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        return "'model' is not a state dict of tensors"
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict) \
            or not isinstance(optimizer.get("param_groups"), list):
        return "'optimizer' is not an optimizer state dict"
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return f"'step' is {step!r}, not a count of updates"
    if not isinstance(payload["rng"], dict):
        return "'rng' is not a dict of generator states"
    for key, kind in (("scaler", dict), ("extra", dict)):
        if payload.get(key) is not None and not isinstance(payload[key], kind):
            return f"{key!r} is a {type(payload[key]).__name__}, not a {kind.__name__}"
    return None


def read_run_state(path: str | os.PathLike) -> dict[str, Any]:
    """The payload of a state.pt, read without running any code from it and checked for structure."""
    p = Path(path)
    fix = "delete it to start the run afresh"
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad pickle or zip, UnpicklingError for a refused global
        raise UserError(f"{p}: cannot read the saved run state ({type(e).__name__}: {_first_line(e)}); {fix}") from None
    problem = _structure_problem(payload)
    if problem:
        raise UserError(f"{p}: not a bigtransfer run state ({problem}); {fix}")
    return payload


def _first_line(e: BaseException) -> str:
    """The informative line of an error: torch's refusal of a global comes wrapped in a page of advice (including
    to retry with full unpickling, which must not be followed here), so only the line naming the refusal is kept."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [line.strip().removeprefix("WeightsUnpickler error:").strip() for line in str(e).splitlines()]
    kept = [line for line in lines if line and not line.startswith(boilerplate)]
    return kept[0] if kept else ""


def load_run_state(path: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler | None = None) -> tuple[int, dict]:
    """Load a saved run state into model and optimizer; return (step, extra).

    The generator states saved beside them are left alone: both loops draw every random number from generators
    seeded by (seed, step), never from the global ones, so nothing needs them back."""
    p = Path(path)
    payload = read_run_state(p)
    try:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(with_own_update_kernel(payload["optimizer"], optimizer))
        if isinstance(optimizer, torch.optim.Optimizer):
            align_optimizer_state(optimizer)
        if scaler is not None and payload.get("scaler") is not None:
            scaler.load_state_dict(payload["scaler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # what torch's loaders raise for a misfit
        raise UserError(f"{p}: the saved run state does not fit this run ({type(e).__name__}: {_first_line(e)}); "
                        "delete it to start the run afresh") from None
    return payload["step"], dict(payload.get("extra") or {})
