"""Classification metrics (top-k, per-class accuracy, confusion matrix) and a JSON-lines run log."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import write_text


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


class Evaluation:
    """Accumulates logits batch by batch into loss, top-1, top-5, per-class accuracy and confusion."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        self.loss_sum = 0.0
        self.top5 = 0
        self.count = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch of logits (N, C) and integer labels (N,)."""
        logits = logits.detach().float().cpu()
        labels = labels.detach().long().cpu()
        self.loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        self.top5 += topk_correct(logits, labels, 5)
        self.confusion += confusion_matrix(labels.numpy(), logits.argmax(dim=1).numpy(), self.num_classes)
        self.count += int(labels.shape[0])

    def result(self) -> dict[str, Any]:
        """The metrics so far: fractions, not percentages; loss is the mean cross-entropy."""
        n = max(self.count, 1)
        return {
            "examples": self.count,
            "loss": self.loss_sum / n if self.count else math.nan,
            "top1": float(np.trace(self.confusion)) / n if self.count else math.nan,
            "top5": self.top5 / n if self.count else math.nan,
            "per_class_accuracy": per_class_accuracy(self.confusion),
            "confusion": self.confusion.tolist(),
        }


def _jsonable(value: Any) -> Any:
    """Numbers JSON can hold: NaN and infinity become null (strict JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


def to_json(value: Any, **kwargs: Any) -> str:
    """json.dumps that writes NaN/inf as null and NumPy scalars as Python numbers."""
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
            raise ValueError(f"{p}: line {i + 1} is not JSON") from None
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
