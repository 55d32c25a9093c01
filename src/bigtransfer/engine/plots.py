"""PNG charts of a run, drawn with matplotlib's Agg backend: loss, learning rate, accuracy, confusions, error bars.

`write_plots(out, records, ...)` draws every chart of a training run from its metrics.jsonl records; fine-tuning
and pre-training both call it (their records differ: fine-tuning nests {"eval": {...}}, pre-training writes flat
eval_* keys; `eval_of` reads either). Every file is written atomically (`bigtransfer.core.atomic`), so a run killed
while drawing leaves the previous chart, never half a PNG.

matplotlib is imported on first use, not with this module: it takes about 2 s to load, and every CLI start would
pay it. If it cannot be imported, the charts are skipped and `say` is told once per folder which files they would
have been; the run itself goes on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.atomic import atomic_path
from .metrics import per_class_accuracy as accuracy_per_class  # renamed: confusion_plot has a parameter of that name

# matplotlib's tab10: distinct for the first ten series.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
SIZE = (800, 500)  # pixels of a line chart (at DPI)
DPI = 100
# Up to this many classes the confusion chart is the full matrix; above it a matrix is unreadable, so the chart is
# a summary instead: the most frequent confusions and the least accurate classes.
MATRIX_MAX_CLASSES = 30
SUMMARY_ROWS = 20
RUN_PLOTS = ("loss.png", "lr.png", "accuracy.png", "confusion.png")

Point = tuple[float, float]
Say = Callable[[str], None]
_told: set[str] = set()  # folders already told that matplotlib is missing


class PlotsUnavailable(ImportError):
    """matplotlib cannot be imported here."""


def _figure(width_px: int, height_px: int) -> Any:
    """A figure on the Agg canvas (no pyplot: no global state, no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise PlotsUnavailable(f"matplotlib is not installed ({e})") from None
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> Path:
    p = Path(path)
    with atomic_path(p) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return p


def plots_skipped(paths: Sequence[str | os.PathLike], say: Say | None) -> None:
    """Say once per folder that matplotlib is missing and which charts are therefore not drawn."""
    if not paths or say is None:
        return
    folder = str(Path(paths[0]).parent)
    if folder in _told:
        return
    _told.add(folder)
    say(f"matplotlib is not installed, so no charts are drawn; they would be {', '.join(str(p) for p in paths)} "
        "(pip install matplotlib, then re-run the same command to draw them)")


def _finite(points: Sequence[Sequence[float]], log_x: bool, log_y: bool) -> list[tuple[float, ...]]:
    """Points that can be drawn: finite, and positive on a log axis."""
    out = []
    for p in points:
        vals = [float(v) for v in p]
        if not all(math.isfinite(v) for v in vals):
            continue
        if (log_x and vals[0] <= 0) or (log_y and any(v <= 0 for v in vals[1:])):
            continue
        out.append(tuple(vals))
    return sorted(out)


def line_figure(series: Mapping[str, Sequence[Point]], title: str, xlabel: str, ylabel: str, log_y: bool = False,
                log_x: bool = False, ylim: tuple[float, float] | None = None, hlines: Mapping[str, float] | None = None,
                size: tuple[int, int] = SIZE) -> Any:
    """A figure with one line per named series of (x, y) points and dashed horizontal reference lines."""
    fig = _figure(*size)
    ax = fig.add_subplot()
    for i, (name, pts) in enumerate(series.items()):
        clean = _finite(pts, log_x, log_y)
        if clean:
            xs, ys = zip(*clean, strict=True)
            ax.plot(xs, ys, color=PALETTE[i % len(PALETTE)], label=name, marker="o" if len(clean) <= 40 else None,
                    markersize=4)
    # The i-th reference line takes the i-th series' colour (chance of top-1 beside top-1), dashed.
    for i, (name, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, color=PALETTE[i % len(PALETTE)], linestyle="--", linewidth=1, alpha=0.8, label=name)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.set_xscale("log" if log_x else "linear")
    ax.set_yscale("log" if log_y else "linear")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(True, which="major", color="0.9")
    if len(ax.get_legend_handles_labels()[0]) > 1:
        ax.legend(loc="best")
    return fig


def line_plot(path: str | os.PathLike, series: Mapping[str, Sequence[Point]], title: str, xlabel: str, ylabel: str,
              log_y: bool = False, log_x: bool = False, ylim: tuple[float, float] | None = None,
              hlines: Mapping[str, float] | None = None, size: tuple[int, int] = SIZE) -> Path:
    """Write a PNG of `line_figure` (raises PlotsUnavailable without matplotlib)."""
    return _save(line_figure(series, title, xlabel, ylabel, log_y, log_x, ylim, hlines, size), path)


def error_bar_figure(series: Mapping[str, Sequence[tuple[float, float, float, float]]], title: str, xlabel: str,
                     ylabel: str, log_x: bool = False, hlines: Mapping[str, float] | None = None,
                     size: tuple[int, int] = SIZE) -> Any:
    """(x, centre, low, high) points per series: a line through the centres, bars from low to high."""
    fig = _figure(*size)
    ax = fig.add_subplot()
    xs_all: set[float] = set()
    for i, (name, pts) in enumerate(series.items()):
        clean = _finite(pts, log_x, False)
        if not clean:
            continue
        x, c, lo, hi = (np.array(v) for v in zip(*clean, strict=True))
        xs_all.update(x.tolist())
        ax.errorbar(x, c, yerr=[c - lo, hi - c], color=PALETTE[i % len(PALETTE)], label=name, marker="o",
                    capsize=5, linewidth=2)
    for name, y in (hlines or {}).items():
        ax.axhline(y, color="0.45", linestyle="--", linewidth=1, label=name)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if log_x:
        ax.set_xscale("log")
    if 0 < len(xs_all) <= 12:  # few x values (shots per class): label exactly those
        ax.set_xticks(sorted(xs_all), [f"{v:g}" for v in sorted(xs_all)])
        ax.minorticks_off()
    ax.grid(True, color="0.9")
    if len(ax.get_legend_handles_labels()[0]) > 1:
        ax.legend(loc="best")
    return fig


def error_bar_plot(path: str | os.PathLike, series: Mapping[str, Sequence[tuple[float, float, float, float]]],
                   title: str, xlabel: str, ylabel: str, log_x: bool = False, hlines: Mapping[str, float] | None = None,
                   size: tuple[int, int] = SIZE, say: Say | None = print) -> Path | None:
    """Write a PNG of `error_bar_figure`; None (after saying so once) when matplotlib is missing.

    Typical use: accuracy (median over seeds) against shots per class, with min/max as the bars.
    """
    try:
        return _save(error_bar_figure(series, title, xlabel, ylabel, log_x, hlines, size), path)
    except PlotsUnavailable:
        plots_skipped([path], say)
        return None


def _short(name: str, limit: int = 18) -> str:
    return name if len(name) <= limit else name[:limit - 1] + "…"


def matrix_figure(matrix: np.ndarray, classes: Sequence[str], title: str) -> Any:
    """The full confusion matrix, cells shaded by the share of their row, counts printed while they fit."""
    n = matrix.shape[0]
    side = int(min(1400, max(520, 160 + 34 * n)))
    fig = _figure(side, side + 40)
    ax = fig.add_subplot()
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    names = [_short(str(c)) for c in classes]
    ax.set_xticks(range(n), names, rotation=90, fontsize=8 if n > 15 else 10)
    ax.set_yticks(range(n), names, fontsize=8 if n > 15 else 10)
    if n <= 15:
        for i, j in zip(*np.nonzero(matrix), strict=True):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=9,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted class", ylabel="true class")
    fig.suptitle(title, wrap=True)
    return fig


def confusion_summary_figure(classes: Sequence[str], top_confusions: Sequence[Mapping[str, int]],
                             per_class_accuracy: Sequence[float | None], title: str) -> Any:
    """For many classes: the most frequent confusions and the least accurate classes, as two bar charts."""
    fig = _figure(1200, 40 * SUMMARY_ROWS + 160)
    left, right = fig.subplots(1, 2)
    pairs = list(top_confusions)[:SUMMARY_ROWS]
    labels = [f"{_short(str(classes[p['true']]))} → {_short(str(classes[p['predicted']]))}" for p in pairs]
    left.barh(range(len(pairs)), [p["count"] for p in pairs], color=PALETTE[3])
    left.set_yticks(range(len(pairs)), labels, fontsize=9)
    left.invert_yaxis()
    left.set(title=f"{len(pairs)} most frequent confusions (true → predicted)", xlabel="images")
    scored = sorted((a, i) for i, a in enumerate(per_class_accuracy) if a is not None)[:SUMMARY_ROWS]
    right.barh(range(len(scored)), [a for a, _ in scored], color=PALETTE[0])
    right.set_yticks(range(len(scored)), [_short(str(classes[i])) for _, i in scored], fontsize=9)
    right.invert_yaxis()
    right.set_xlim(0.0, 1.0)
    right.set(title=f"{len(scored)} least accurate classes", xlabel="accuracy (share of the class right)")
    fig.suptitle(title, wrap=True)
    return fig


def _from_matrix(m: np.ndarray) -> tuple[list[dict[str, int]], list[float | None]]:
    """Top confusions and per-class accuracy of a count matrix (for callers that only have the matrix), ordered
    as `engine.metrics.confusion_report` orders them: by count, ties to the smaller (true, predicted)."""
    off = m.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:SUMMARY_ROWS]
    pairs = [{"true": int(k // m.shape[0]), "predicted": int(k % m.shape[0]), "count": int(off.flat[k])}
             for k in order if off.flat[k] > 0]
    return pairs, accuracy_per_class(m)


def confusion_plot(path: str | os.PathLike, matrix: Sequence[Sequence[int]] | np.ndarray | None,
                   classes: Sequence[str], *, top_confusions: Sequence[Mapping[str, int]] | None = None,
                   per_class_accuracy: Sequence[float | None] | None = None,
                   title: str = "Confusion matrix (rows: true class, columns: predicted)") -> Path:
    """The confusion chart: the matrix up to MATRIX_MAX_CLASSES classes, else (or without a matrix) a summary.

    The summary uses `top_confusions` and `per_class_accuracy` (as `engine.metrics.Evaluation` reports them); a
    matrix given without them is summarised by `_from_matrix`.
    """
    n = len(classes)
    m = None if matrix is None else np.asarray(matrix, dtype=np.int64)
    if m is not None and m.shape != (n, n):
        raise ValueError(f"confusion matrix of shape {m.shape} does not match {n} class names")
    if m is not None and n <= MATRIX_MAX_CLASSES:
        return _save(matrix_figure(m, classes, title), path)
    if (top_confusions is None or per_class_accuracy is None) and m is not None:
        top_confusions, per_class_accuracy = _from_matrix(m)
    if top_confusions is None or per_class_accuracy is None:
        raise ValueError("a confusion summary needs top_confusions and per_class_accuracy when there is no matrix")
    summary_title = f"Confusions of {n} classes (too many for a readable matrix)"
    return _save(confusion_summary_figure(classes, top_confusions, per_class_accuracy, summary_title), path)


def eval_of(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The evaluation of a metrics record: fine-tuning's nested "eval", or pre-training's flat eval_* keys."""
    if isinstance(record.get("eval"), Mapping):
        return dict(record["eval"])
    flat = {k[len("eval_"):]: v for k, v in record.items() if k.startswith("eval_")}
    if not flat:
        return None
    if "precision_at_1" in flat:
        flat.setdefault("top1", flat["precision_at_1"])  # precision@1 is top-1 on single-label data
    return flat


def _chart_series(records: Sequence[Mapping[str, Any]]) -> tuple[dict, dict, dict]:
    """Loss, lr and accuracy series of a run's records."""
    train, evals = [], []
    for r in records:  # eval_of once per record: a pre-training log holds one record per logged step
        e = eval_of(r)
        if e is not None:
            evals.append((r["step"], e))
        elif "loss" in r:
            train.append(r)
    loss = {"training loss": [(r["step"], r["loss"]) for r in train]}
    if evals:
        loss["evaluation loss"] = [(s, e["loss"]) for s, e in evals if e.get("loss") is not None]
    lr = {"lr": [(r["step"], r["lr"]) for r in train if "lr" in r]}
    acc = {name: [(s, e[key]) for s, e in evals if e.get(key) is not None]
           for key, name in (("top1", "top-1"), ("top5", "top-5"))}
    return loss, lr, {k: v for k, v in acc.items() if v}


def write_plots(out: str | os.PathLike, records: Sequence[Mapping[str, Any]], *, classes: Sequence[str] | None = None,
                evaluation: Mapping[str, Any] | None = None, chance: Mapping[str, float] | None = None,
                metric: str = "accuracy", lr_title: str = "Learning rate", loss_label: str = "cross-entropy",
                say: Say | None = print) -> list[Path]:
    """Every chart of a run in OUT: loss.png, lr.png (log scale), accuracy.png (with chance levels), confusion.png.

    `records`: the run's metrics records; `evaluation`: the latest evaluation result with its confusions
    (`engine.metrics.Evaluation.result()`), for confusion.png; `chance`: reference lines on the accuracy chart,
    e.g. {"chance (top-1)": 1 / classes}. Returns the files written; none (after saying so once) without matplotlib.
    """
    out = Path(out)
    loss, lr, acc = _chart_series(records)
    if classes is not None and len(classes) <= 5:
        acc.pop("top-5", None)  # always 1.0 with 5 classes or fewer: says nothing
    wanted = [out / n for n in RUN_PLOTS[:3]]
    if evaluation is not None and classes is not None:
        wanted.append(out / "confusion.png")
    try:
        written = [line_plot(wanted[0], loss, "Loss", "step", loss_label, log_y=True),
                   line_plot(wanted[1], lr, lr_title, "step", "learning rate (log scale)", log_y=True),
                   line_plot(wanted[2], acc, f"Evaluation {metric}", "step", f"{metric} (fraction)", ylim=(0.0, 1.0),
                             hlines=chance)]
        if len(wanted) == 4:
            written.append(confusion_plot(wanted[3], evaluation.get("confusion"), classes,
                                          top_confusions=evaluation.get("top_confusions"),
                                          per_class_accuracy=evaluation.get("per_class_accuracy")))
    except PlotsUnavailable:
        plots_skipped(wanted, say)
        return []
    return written


def chance_levels(num_classes: int) -> dict[str, float]:
    """Accuracy of guessing uniformly at random: 1/C for top-1, 5/C for top-5 (when there are more than 5 classes)."""
    levels = {"chance (top-1)": 1.0 / num_classes}
    if num_classes > 5:
        levels["chance (top-5)"] = 5.0 / num_classes
    return levels
