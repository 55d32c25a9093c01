"""The run folder every training loop shares: lock, saved config and the one resume rule, config.json, state.pt.

A loop (fine-tuning, pre-training, distillation, ...) uses it in this order:

    rundir = RunDir(config.out, files=RUN_FILES)
    with rundir.lock(), rundir.stop_on_signal() as stop:       # one owner; SIGTERM waits for a step boundary
        resume = rundir.resume_point(settings(config), Config.RESUMABLE_CHANGES, overwrite=...)
        ...                                                     # data, plan, model, optimizer
        if resume:
            step, extra = rundir.load_state(model=..., optimizer=..., scaler=...)
        rundir.write_config({...})                              # atomic, pretty JSON
        for step in ...:
            ...
            rundir.save_state(model=..., optimizer=..., step=done, **extra)   # atomic

The one resume rule: each run config declares, as the class attribute `RESUMABLE_CHANGES`, the settings that may
differ between a run and its resumption (how the work is spread, logged or shown: devices, workers, batch split,
evaluation cadence, ...). Every other setting must equal the saved one, or resuming is refused with a message naming
each difference (`changed_settings`). A setting the saved run does not record (added to the code after that run
was written) is not compared, so older runs keep resuming. A new setting that only changes how a run is shown or
logged belongs in RESUMABLE_CHANGES; anything else must match by default, which is the safe side.

Two config.json layouts exist and are both read (`saved_settings`): fine-tuning's {"settings": {...}, "plan",
"resolved", "data", "versions"} and pre-training's flat {field: value, ..., "plan": {...}}. Pre-training compares
against the config saved inside state.pt (`extra["config"]`), which it wrote beside the weights it resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch

from ..core.atomic import write_text
from ..core.errors import UserError
from ..core.runfolder import LOCK_FILE, StopOnSignal, own_folder
from .metrics import to_json
from .runstate import load_run_state, save_run_state

CONFIG_FILE = "config.json"
STATE_FILE = "state.pt"
KERNELS_FILE = "kernels.json"  # the run's measured kernel choices (`model.kernelcal.TrainingKernels`)


class RunDirError(UserError):
    """The run directory holds something that this run must not resume or overwrite."""


def flag(name: str) -> str:
    """The command-line spelling of a setting: batch_split -> --batch-split."""
    return "--" + name.replace("_", "-")


def as_saved(settings: Any) -> dict[str, Any]:
    """A config (dataclass or dict) in the form config.json stores it: tuples as lists, paths as `to_json` shows
    them; what a saved config is compared with."""
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        settings = dataclasses.asdict(settings)
    return json.loads(to_json(settings))


def must_match(config_class: type) -> tuple[str, ...]:
    """The settings of `config_class` that must equal the saved ones to resume: all but its RESUMABLE_CHANGES."""
    may_change = config_class.RESUMABLE_CHANGES
    return tuple(f.name for f in dataclasses.fields(config_class) if f.name not in may_change)


def changed_settings(saved: Mapping[str, Any], new: Mapping[str, Any], may_change: Collection[str]) -> list[str]:
    """'--name was OLD, now NEW' for every setting outside `may_change` whose value differs from the saved one.

    Both sides are compared in their saved (JSON) form; a setting missing from `saved` is not compared."""
    old, now = as_saved(dict(saved)), as_saved(dict(new))
    return [f"{flag(k)} was {old[k]!r}, now {v!r}" for k, v in now.items()
            if k not in may_change and k in old and old[k] != v]


def saved_settings(config_file: Path) -> dict[str, Any]:
    """The settings recorded in a config.json of either layout (see the module docstring)."""
    try:
        doc = json.loads(Path(config_file).read_text())
        settings = doc["settings"] if "settings" in doc else {k: v for k, v in doc.items() if k != "plan"}
        if not isinstance(settings, dict):
            raise TypeError(f"the settings are a {type(settings).__name__}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise RunDirError(f"{config_file}: unreadable ({e}); pass --overwrite to start afresh") from None
    return settings


class RunDir:
    """One run's folder: its lock, its saved config and state, and the files the run writes (`files`)."""

    def __init__(self, out: str | os.PathLike, files: Collection[str] = ()) -> None:
        self.path = Path(out)
        self.files = tuple(files)
        self.config_file = self.path / CONFIG_FILE
        self.state_file = self.path / STATE_FILE
        self.kernels_file = self.path / KERNELS_FILE

    def lock(self, what: str = "run folder") -> contextlib.AbstractContextManager[Path]:
        """Own the folder for the `with` block (`core.runfolder.own_folder`): one process at a time writes it."""
        return own_folder(self.path, what)

    def stop_on_signal(self, report: bool = True) -> StopOnSignal:
        """SIGTERM becomes a request the loop honours at its next step boundary (`core.runfolder.StopOnSignal`)."""
        return StopOnSignal(self.state_file, report=report)

    def has_state(self) -> bool:
        """Whether a state.pt to resume from is there."""
        return self.state_file.is_file()

    def refuse_changes(self, saved: Mapping[str, Any], new: Mapping[str, Any], may_change: Collection[str],
                       where: Path | None = None, advice: str = "pass --overwrite to start afresh, or choose "
                       "another --out") -> None:
        """Raise RunDirError naming each setting that differs from the saved one (the one resume rule)."""
        differ = changed_settings(saved, new, may_change)
        if differ:
            raise RunDirError(f"{where or self.path} holds a run with other settings ({'; '.join(differ)}); {advice}")

    def resume_point(self, settings: Mapping[str, Any], may_change: Collection[str], overwrite: bool = False) -> bool:
        """Check the folder against a new run's settings; True when there is a state.pt to resume from.

        Refused: a non-empty folder that is not a run folder, and a run with other settings that saved a state
        or finished. A run with other settings that saved nothing yet is started afresh; `overwrite` removes the
        run's files first.
        """
        if overwrite:
            # Removed last to first: config.json, listed first, goes last, so a half-cleared folder is still a run.
            for name in reversed(self.files):
                (self.path / name).unlink(missing_ok=True)
            return False
        if not self.path.exists() or not any(p.name != LOCK_FILE for p in self.path.iterdir()):
            return False
        if not self.config_file.is_file():
            raise RunDirError(f"{self.path}: exists and is not a bigtransfer run directory (no config.json); "
                              "choose another --out or pass --overwrite")
        saved = saved_settings(self.config_file)
        if changed_settings(saved, settings, may_change):
            if (self.path / "summary.json").is_file() or self.has_state():
                self.refuse_changes(saved, settings, may_change)
            return False
        return self.has_state()

    def finished_without_state(self, settings: Mapping[str, Any], may_change: Collection[str]) -> bool:
        """Whether the folder holds a run that finished with these settings (its summary.json is there) and then
        removed its state.pt, as fine-tuning does unless told to keep it: nothing is left to train."""
        if self.has_state() or not (self.path / "summary.json").is_file() or not self.config_file.is_file():
            return False
        return not changed_settings(saved_settings(self.config_file), settings, may_change)

    def write_config(self, payload: Mapping[str, Any]) -> None:
        """config.json, written atomically (pretty JSON, NaN as null)."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_text(self.config_file, to_json(payload, indent=2) + "\n")

    def save_state(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                   scaler: torch.amp.GradScaler | None = None, **extra: Any) -> None:
        """state.pt, written atomically: weights, optimizer, step, scaler and `extra` (`engine.runstate`)."""
        save_run_state(self.state_file, model=model, optimizer=optimizer, step=step, scaler=scaler, **extra)

    def load_state(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler | None = None) -> tuple[int, dict[str, Any]]:
        """Load state.pt into model, optimizer and scaler; (step, extra)."""
        return load_run_state(self.state_file, model=model, optimizer=optimizer, scaler=scaler)
