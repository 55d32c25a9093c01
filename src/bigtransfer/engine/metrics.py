"""Classification metrics (top-k, per-class accuracy, confusion matrix) and a run's metrics log.

`MetricsLog` is the one writer of a run's records: metrics.jsonl (every record as logged), metrics.csv (the same
records, one row each, scalar values only, nested keys joined with "_": {"eval": {"top1": x}} is column eval_top1)
and, when asked, TensorBoard event files in OUT/tensorboard (tags train/<key> and eval/<key>).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..core.atomic import write_text
from ..core.errors import SetupError, UserError
from ..core.paths import shown

# The full (C, C) confusion matrix is kept up to this many classes (a plot of it is still legible, its JSON small);
# above, it grows with classes squared (3.8 GB of int64 at BiT-M's 21,843 classes), so only the TOP_CONFUSIONS
# most frequent (true, predicted) pairs are reported, counted from the examples without any C x C array.
CONFUSION_MAX_CLASSES = 100
TOP_CONFUSIONS = 20


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """How many rows have their label among the k largest logits (k is capped at the class count)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return int((top == labels[:, None]).any(dim=1).sum())


def confusion_matrix(labels: np.ndarray | torch.Tensor, preds: np.ndarray | torch.Tensor, num_classes: int) -> np.ndarray:
    """Counts [true class, predicted class] as an int64 (C, C) array."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    p = np.asarray(preds, dtype=np.int64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.shape[0]}) and predictions ({p.shape[0]}) differ in length")
    return np.bincount(y * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: np.ndarray) -> list[float | None]:
    """Recall of each class from a confusion matrix; None for a class without examples."""
    totals = confusion.sum(axis=1)
    return [float(confusion[i, i] / t) if t else None for i, t in enumerate(totals)]


def confusion_report(labels: np.ndarray | torch.Tensor, preds: np.ndarray | torch.Tensor,
                     num_classes: int) -> dict[str, Any]:
    """Per-class accuracy, the confusion matrix (None above CONFUSION_MAX_CLASSES) and the most frequent confusions.

    Memory grows with the examples and the classes, never with classes squared beyond CONFUSION_MAX_CLASSES.
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    p = np.asarray(preds, dtype=np.int64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.shape[0]}) and predictions ({p.shape[0]}) differ in length")
    totals = np.bincount(y, minlength=num_classes)
    correct = np.bincount(y[y == p], minlength=num_classes)
    wrong = y != p
    pairs, counts = np.unique(y[wrong] * num_classes + p[wrong], return_counts=True)
    order = np.argsort(-counts, kind="stable")[:TOP_CONFUSIONS]  # ties: the smaller (true, pred) first
    return {
        "per_class_accuracy": [float(c / t) if t else None for c, t in zip(correct.tolist(), totals.tolist(),
                                                                          strict=True)],
        "confusion": confusion_matrix(y, p, num_classes).tolist() if num_classes <= CONFUSION_MAX_CLASSES else None,
        "top_confusions": [{"true": int(pairs[i] // num_classes), "predicted": int(pairs[i] % num_classes),
                            "count": int(counts[i])} for i in order],
    }


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class Evaluation:
    """Accumulates logits batch by batch into loss, top-1, top-5, per-class accuracy and confusions."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.labels: list[np.ndarray] = []  # per batch; O(examples) memory, unlike a (C, C) matrix
        self.preds: list[np.ndarray] = []
        self.correct = 0
        self.loss_sum = 0.0
        self.top5 = 0
        self.count = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch of logits (N, C) and integer labels (N,)."""
        logits = logits.detach().float().cpu()
        labels = labels.detach().long().cpu()
        self.loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        self.top5 += topk_correct(logits, labels, 5)
        preds = logits.argmax(dim=1)
        self.correct += int((preds == labels).sum())
        self.labels.append(labels.numpy())
        self.preds.append(preds.numpy())
        self.count += int(labels.shape[0])

    def result(self) -> dict[str, Any]:
        """The metrics so far: fractions, not percentages; loss is the mean cross-entropy.

        "confusion" is the (C, C) count matrix as lists, None above CONFUSION_MAX_CLASSES classes;
        "top_confusions" the most frequent wrong (true, predicted) pairs either way.
        """
        n = max(self.count, 1)
        return {
            "examples": self.count,
            "loss": self.loss_sum / n if self.count else math.nan,
            "top1": self.correct / n if self.count else math.nan,
            "top5": self.top5 / n if self.count else math.nan,
            **confusion_report(_joined(self.labels), _joined(self.preds), self.num_classes),
        }


def _jsonable(value: Any) -> Any:
    """Values strict JSON can hold: NaN and infinity become null, undecodable file-name bytes escaped (`shown`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str):
        return shown(value)
    if isinstance(value, dict):
        return {shown(k) if isinstance(k, str) else k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


def to_json(value: Any, **kwargs: Any) -> str:
    """json.dumps that writes NaN/inf as null, NumPy scalars as Python numbers, and no lone surrogates."""
    return json.dumps(_jsonable(value), allow_nan=False, **kwargs)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a torn last line (a killed writer) is dropped."""
    p = Path(path)
    if not p.exists():
        return []
    records = []
    lines = p.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise UserError(f"{p}: line {i + 1} is not JSON") from None
    return records


class JsonlLogger:
    """Appends one JSON record per line, flushed at once, so a killed run keeps what it logged.

    `keep_until_step`: when resuming, records with a larger "step" (logged after the state that is
    being resumed from) are dropped so that the log reads as one uninterrupted run; None starts empty.
    """

    def __init__(self, path: str | os.PathLike, keep_until_step: int | None = None) -> None:
        self.path = Path(path)
        kept = []
        if keep_until_step is not None:
            kept = [r for r in read_jsonl(self.path) if int(r.get("step", 0)) <= keep_until_step]
        write_text(self.path, "".join(to_json(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def log(self, record: dict[str, Any]) -> None:
        """Write one record."""
        self._file.write(to_json(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> JsonlLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


TENSORBOARD_DIR = "tensorboard"


def require_tensorboard() -> Any:
    """torch's TensorBoard writer class; SetupError saying how to install it when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: imported only for --tensorboard
    except ImportError:
        raise SetupError("--tensorboard needs the tensorboard package: pip install 'bigtransfer[tensorboard]' "
                         "(or tensorboard)") from None
    return SummaryWriter


def flat_scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float | int | str | None]:
    """The scalar values of a record with nested keys joined by "_" (lists, e.g. per-class accuracy, left out)."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_scalars(value, f"{name}_"))
        elif value is None or isinstance(value, bool | int | float | str | np.generic):
            out[name] = _jsonable(value)
    return out


def _tag(column: str) -> str:
    """A TensorBoard tag: eval/<metric> for evaluation columns, train/<metric> for the rest."""
    return f"eval/{column[5:]}" if column.startswith("eval_") else f"train/{column}"


class _CsvLog:
    """metrics.csv: one row per record of metrics.jsonl. A record with a new column (the first evaluation, say)
    rewrites the file from metrics.jsonl with the wider header, atomically; that happens a handful of times per run,
    and no row is held in memory."""

    def __init__(self, path: Path, jsonl: Path) -> None:
        self.path, self.jsonl = path, jsonl
        self.columns: list[str] = []
        self._rewrite()

    def _grow(self, row: dict[str, Any]) -> bool:
        new = [k for k in row if k not in self.columns]
        self.columns += new
        return bool(new)

    def _rewrite(self) -> None:
        rows = [flat_scalars(r) for r in read_jsonl(self.jsonl)]
        for row in rows:
            self._grow(row)
        if "step" in self.columns:
            self.columns.insert(0, self.columns.pop(self.columns.index("step")))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.path, buf.getvalue())

    def log(self, row: dict[str, Any]) -> None:
        """Add the row (`flat_scalars`) of a record already written to metrics.jsonl."""
        if self._grow(row):
            self._rewrite()
            return
        buf = io.StringIO()
        csv.DictWriter(buf, self.columns, lineterminator="\n").writerow(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(buf.getvalue())


class MetricsLog:
    """A run's records into metrics.jsonl, metrics.csv and (tensorboard=True) TensorBoard event files in OUT.

    `keep_until_step` as `JsonlLogger`'s: when resuming, what was logged after the resumed state is dropped from
    all three (TensorBoard hides it with a purge at the next step); None starts every log empty (old event files
    of an earlier run in OUT/tensorboard are removed).
    """

    def __init__(self, out: str | os.PathLike, keep_until_step: int | None = None, tensorboard: bool = False) -> None:
        out = Path(out)
        writer_class = require_tensorboard() if tensorboard else None
        self.jsonl = JsonlLogger(out / "metrics.jsonl", keep_until_step)
        self.csv = _CsvLog(out / "metrics.csv", self.jsonl.path)
        self.board = None
        if writer_class is not None:
            folder = out / TENSORBOARD_DIR
            if keep_until_step is None and folder.is_dir():
                for old in folder.glob("events.out.tfevents.*"):
                    old.unlink()
            self.board = writer_class(str(folder), purge_step=None if keep_until_step is None else keep_until_step + 1)

    def log(self, record: dict[str, Any]) -> None:
        """Write one record to every log."""
        self.jsonl.log(record)
        row = flat_scalars(record)  # once per record: logged every step, shared by the CSV and TensorBoard
        self.csv.log(row)
        if self.board is not None:
            step = int(row.get("step", 0) or 0)
            for column, value in row.items():
                if column != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self.board.add_scalar(_tag(column), value, step)

    def close(self) -> None:
        """Close the files (TensorBoard's are flushed)."""
        self.jsonl.close()
        if self.board is not None:
            self.board.close()
            self.board = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
