"""What the fine-tuning protocols (few-shot, VTAB-1k) share: training options, run-or-reuse, split manifests, tables.

A protocol is many `run_finetune` runs, one run directory each, under the protocol's OUT. A run that already
finished with the same settings (its summary.json exists and its config.json's settings that matter are equal)
is reused without touching it; an interrupted one is resumed by `run_finetune` itself.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..core.atomic import atomic_path, write_text
from ..core.errors import UserError
from ..engine.metrics import to_json
from ..engine.rundir import changed_settings
from ..transfer.finetune import SETTINGS_THAT_MATTER, FinetuneConfig, run_finetune
from .config import ONLY_AT_END, SAVE_EVERY, SHARED_SETTINGS, TrainOptions  # noqa: F401 - their home before config.py

# The TrainOptions that change what a run computes (device, workers and batch_split do not).
TRAIN_SETTINGS = tuple(k for k in SETTINGS_THAT_MATTER if k in {f.name for f in dataclasses.fields(TrainOptions)})


class ProtocolDirError(UserError):
    """The protocol's OUT holds runs made with other settings."""


def _lookup(doc: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        doc = doc.get(part) if isinstance(doc, dict) else None
    return doc


def check_out_dir(out: Path, config: Any, keys: Sequence[str], what: str = "runs") -> None:
    """Refuse an OUT whose config.json holds other values of `keys` (dotted, e.g. 'train.steps') than `config`."""
    file = Path(out) / "config.json"
    if not file.is_file():
        return
    try:
        old = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ProtocolDirError(f"{file}: unreadable ({e}); pass --overwrite or choose another --out") from None
    new = json.loads(to_json(dataclasses.asdict(config)))
    differ = [f"--{key.rsplit('.', 1)[-1].replace('_', '-')} was {_lookup(old, key)!r}, now {_lookup(new, key)!r}"
              for key in keys if _lookup(old, key) != _lookup(new, key)]
    if differ:
        raise ProtocolDirError(f"{out} holds {what} made with other settings ({'; '.join(differ)}); "
                               "pass --overwrite to redo them, or choose another --out")


def finished_summary(config: FinetuneConfig) -> dict[str, Any] | None:
    """The summary of the run in config.out if it finished with the same settings that matter, else None."""
    c = config.normalized()
    out = Path(c.out)
    try:
        old = json.loads((out / "config.json").read_text())["settings"]
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(old, dict) or changed_settings(old, dataclasses.asdict(c), FinetuneConfig.RESUMABLE_CHANGES):
        return None
    return summary


def run_or_reuse(config: FinetuneConfig, reuse: bool = True) -> tuple[dict[str, Any], bool]:
    """(summary, reused): the finished run's summary when it can be reused, else run_finetune's (resuming if killed)."""
    if reuse and not config.overwrite:
        summary = finished_summary(config)
        if summary is not None:
            return summary, True
    return run_finetune(config), False


def write_split_manifest(path: str | Path, rows: Sequence[tuple[str, str, str]]) -> bool:
    """Write a CSV manifest of (path, label, split) rows atomically; False when the file already held exactly that."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label", "split"])
    writer.writerows(rows)
    text = buf.getvalue()
    p = Path(path)
    # File names that are not UTF-8 go out as the OS's bytes, as the manifest reader takes them back.
    data = text.encode("utf-8", "surrogateescape")
    if p.is_file() and p.read_bytes() == data:
        return False
    with atomic_path(p) as tmp:
        tmp.write_bytes(data)
    return True


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, mean, min and max of a non-empty list of scores."""
    if not values:
        raise ValueError("no scores to summarize")
    return {"median": statistics.median(values), "mean": statistics.fmean(values), "min": min(values),
            "max": max(values)}


def percent(value: float | None) -> str:
    """A fraction as a percentage with two decimals ('-' for None)."""
    return "-" if value is None else f"{100.0 * value:.2f}"


def _numeric(column: Sequence[str]) -> bool:
    def number(cell: str) -> bool:
        try:
            float(cell)
        except ValueError:
            return cell == "-"
        return True

    return all(number(str(c)) for c in column)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain table with aligned columns for the terminal (numbers right-aligned, text left-aligned)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    right = [_numeric([r[i] for r in rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).rjust(w) if r else str(c).ljust(w) for c, w, r in zip(cells, widths, right,
                                                                                     strict=True)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown (GitHub) table, numbers right-aligned."""
    align = ["---:" if _numeric([r[i] for r in rows]) else ":---" for i in range(len(header))]
    return "\n".join("| " + " | ".join(str(c) for c in r) + " |" for r in [header, align, *rows])


def time_note(results: dict[str, Any], runs: int) -> str:
    """One sentence on the time the results cost: all runs together, and this invocation."""
    reused = results["runs_reused"]
    return (f"The {runs} runs took {results['train_time_s']:.1f} s of fine-tuning in total"
            + (f" ({reused} reused from an earlier invocation)" if reused else "")
            + f"; this invocation took {results['wall_time_s']:.1f} s.")


def save_json(path: str | Path, value: Any) -> None:
    """Write a JSON document atomically (NaN as null)."""
    write_text(path, to_json(value, indent=2) + "\n")


Say = Callable[[str], None]
