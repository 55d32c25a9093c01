"""Metrics against hand computations and scikit-learn; plots are real PNGs with the data where it belongs."""

import csv
import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageColor

from bigtransfer.core.errors import SetupError
from bigtransfer.engine.metrics import (
    Evaluation,
    JsonlLogger,
    MetricsLog,
    confusion_matrix,
    per_class_accuracy,
    read_jsonl,
    to_json,
    topk_correct,
)
from bigtransfer.engine.plots import (
    PALETTE,
    chance_levels,
    confusion_plot,
    error_bar_plot,
    line_figure,
    line_plot,
    write_plots,
)


def test_topk_by_hand():
    logits = torch.tensor([[0.1, 0.5, 0.2, 0.0, 0.9, 0.3],   # order: 4, 1, 5, 2, 0, 3
                           [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])  # order: 5, 4, 3, 2, 1, 0
    labels = torch.tensor([1, 0, 0])
    assert topk_correct(logits, labels, 1) == 1       # only row 1
    assert topk_correct(logits, labels, 2) == 2       # row 0's label is second
    assert topk_correct(logits, labels, 5) == 2       # row 2's label is last of six
    assert topk_correct(logits[:, :3], labels, 5) == 3  # k capped at 3 classes: always right


def test_confusion_and_per_class_by_hand_and_against_sklearn():
    y = [0, 0, 1, 2, 2, 2]
    p = [0, 1, 1, 2, 0, 2]
    m = confusion_matrix(y, p, 4)
    assert m.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    assert per_class_accuracy(m) == [0.5, 1.0, 2 / 3, None]  # class 3 has no examples
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 7, 500), rng.integers(0, 7, 500)
    np.testing.assert_array_equal(confusion_matrix(y, p, 7), sk.confusion_matrix(y, p, labels=range(7)))
    np.testing.assert_allclose([a for a in per_class_accuracy(confusion_matrix(y, p, 7))],
                               sk.recall_score(y, p, labels=range(7), average=None))


def test_evaluation_over_batches_equals_hand_values():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 7, generator=g)
    labels = torch.randint(0, 7, (50,), generator=g)
    ev = Evaluation(7)
    for a in range(0, 50, 16):  # uneven batches: 16, 16, 16, 2
        ev.update(logits[a:a + 16], labels[a:a + 16])
    r = ev.result()
    lsm = logits.double().log_softmax(1).numpy()
    assert r["loss"] == pytest.approx(-lsm[np.arange(50), labels.numpy()].mean(), rel=1e-6)
    pred = logits.argmax(1)
    assert r["top1"] == pytest.approx(float((pred == labels).double().mean()))
    ranks = (logits > logits[torch.arange(50), labels][:, None]).sum(1)  # classes scoring above the label
    assert r["top5"] == pytest.approx(float((ranks < 5).double().mean()))
    assert r["examples"] == 50 and np.sum(r["confusion"]) == 50
    json.loads(to_json(r))  # the whole result is strict JSON


def test_jsonl_logger_resume_keeps_only_earlier_steps_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with JsonlLogger(path) as log:
        for s in range(1, 6):
            log.log({"step": s, "loss": 1.0 / s})
        log.log({"step": 5, "eval": {"top1": math.nan}})
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # a writer killed mid-line
    records = read_jsonl(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 5]
    assert records[-1]["eval"]["top1"] is None  # NaN written as null: strict JSON
    with JsonlLogger(path, keep_until_step=3) as log:
        log.log({"step": 4, "loss": 0.0})
    assert [(r["step"], r["loss"]) for r in read_jsonl(path)] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.0)]
    JsonlLogger(path).close()  # a fresh run starts empty
    assert read_jsonl(path) == []


def _pixels_of(path, colour):
    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    target = np.array(ImageColor.getrgb(colour))
    return np.argwhere(np.abs(a - target).sum(axis=2) < 30)  # (row, col) of pixels in that colour


def test_line_plot_draws_each_series_where_its_data_is(tmp_path):
    rising = [(s, s / 100) for s in range(101)]
    falling = [(s, 1 - s / 100) for s in range(101)]
    path = line_plot(tmp_path / "lines.png", {"up": rising, "down": falling}, "two lines", "step", "value")
    img = Image.open(path)
    assert img.format == "PNG" and img.size == (800, 500)
    up, down = _pixels_of(path, PALETTE[0]), _pixels_of(path, PALETTE[1])
    assert len(up) > 300 and len(down) > 300
    # Image rows grow downwards: the rising line ends higher up than it starts; the falling one the reverse.
    assert up[up[:, 1].argmax(), 0] < up[up[:, 1].argmin(), 0]
    assert down[down[:, 1].argmax(), 0] > down[down[:, 1].argmin(), 0]


def test_line_plot_log_axis_tolerates_bad_values_and_empty_series(tmp_path):
    path = line_plot(tmp_path / "log.png", {"loss": [(0, 2.3), (1, 0.0), (2, math.nan), (3, 0.01)], "none": []},
                     "loss", "step", "loss", log_y=True)
    assert Image.open(path).size == (800, 500)
    assert len(_pixels_of(path, PALETTE[0])) > 100


def test_error_bar_plot_and_confusion_plot(tmp_path):
    series = {"a": [(1, 0.5, 0.4, 0.6), (5, 0.7, 0.6, 0.8)], "b": [(1, 0.2, 0.1, 0.3), (10, 0.4, 0.35, 0.5)]}
    path = error_bar_plot(tmp_path / "shots.png", series, "few-shot", "shots", "top-1", log_x=True)
    assert len(_pixels_of(path, PALETTE[0])) > 100 and len(_pixels_of(path, PALETTE[1])) > 100

    m = np.array([[10, 0, 0], [2, 8, 0], [0, 5, 5]])
    path = confusion_plot(tmp_path / "conf.png", m, ["cat", "dog", "a very long class name indeed"])
    a = np.asarray(Image.open(path).convert("RGB"))
    assert (np.abs(a.astype(int) - [8, 48, 107]).sum(axis=2) == 0).sum() > 100  # the 100% cell, darkest blue
    with pytest.raises(ValueError, match="does not match"):
        confusion_plot(tmp_path / "bad.png", m, ["a", "b"])
    assert not (tmp_path / "bad.png").exists()


def _run_records(steps=6, classes=3):
    """Records as a fine-tuning run logs them: one per step, an evaluation (nested) every 3 steps."""
    out = []
    for s in range(1, steps + 1):
        out.append({"step": s, "loss": 2.0 / s, "lr": 0.0 if s == 1 else 0.01 / 10 ** (s // 3), "images_per_s": 9.5})
        if s % 3 == 0:
            out.append({"step": s, "eval": {"examples": 6, "loss": 1.0 / s, "top1": 0.2 * s / 3, "top5": 1.0,
                                            "per_class_accuracy": [0.5] * classes}})
    return out


def _png_size(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()  # the whole file decodes
        return img.size


def test_write_plots_draws_every_chart_as_a_sane_png_with_log_lr_and_chance(tmp_path):
    ev = Evaluation(3)
    ev.update(torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [3.0, 0, 0]]), torch.tensor([0, 1, 2]))
    written = write_plots(tmp_path, _run_records(), classes=["cat", "dog", "owl"], evaluation=ev.result(),
                          chance=chance_levels(3))
    assert [p.name for p in written] == ["loss.png", "lr.png", "accuracy.png", "confusion.png"]
    for p in written:
        w, h = _png_size(p)
        assert 300 <= w <= 2000 and 300 <= h <= 2000, (p.name, w, h)
    assert not list(tmp_path.glob(".*partial"))
    lr = line_figure({"lr": [(1, 0.0), (2, 0.01), (3, 0.001)]}, "lr", "step", "lr", log_y=True)
    assert lr.axes[0].get_yscale() == "log"
    assert sorted(lr.axes[0].lines[0].get_ydata()) == [0.001, 0.01]  # lr 0 (warmup's first step) has no log
    acc = line_figure({"top-1": [(3, 0.2)]}, "acc", "step", "acc", hlines=chance_levels(10))
    refs = {ln.get_label(): ln.get_ydata()[0] for ln in acc.axes[0].lines if ln.get_label().startswith("chance")}
    assert refs == {"chance (top-1)": 0.1, "chance (top-5)": 0.5}
    assert chance_levels(5) == {"chance (top-1)": 0.2}  # top-5 of 5 classes is always right: no line


def test_confusion_chart_is_a_matrix_up_to_30_classes_and_a_summary_above(tmp_path):
    rng = np.random.default_rng(0)
    for n in (3, 30, 31, 150):
        m = rng.integers(0, 5, (n, n)) + np.eye(n, dtype=int) * 20
        classes = [f"class number {i} with a long name" for i in range(n)]
        w, h = _png_size(confusion_plot(tmp_path / f"c{n}.png", m, classes))
        assert 500 <= w <= 1400 and 500 <= h <= 1500, (n, w, h)
    y = rng.integers(0, 300, 2000)
    p = np.where(rng.random(2000) < 0.7, y, rng.integers(0, 300, 2000))
    ev = Evaluation(300)  # above CONFUSION_MAX_CLASSES: no matrix, only the top confusions
    ev.update(torch.nn.functional.one_hot(torch.tensor(p), 300).float(), torch.tensor(y))
    r = ev.result()
    assert r["confusion"] is None
    _png_size(confusion_plot(tmp_path / "many.png", None, [str(i) for i in range(300)],
                             top_confusions=r["top_confusions"], per_class_accuracy=r["per_class_accuracy"]))
    with pytest.raises(ValueError, match="needs top_confusions"):
        confusion_plot(tmp_path / "none.png", None, ["a", "b"])


def test_the_summary_of_a_matrix_equals_what_the_evaluation_reports():
    from bigtransfer.engine.metrics import confusion_report
    from bigtransfer.engine.plots import _from_matrix

    rng = np.random.default_rng(1)
    y = rng.integers(0, 40, 3000)
    p = np.where(rng.random(3000) < 0.6, y, rng.integers(0, 40, 3000))
    report = confusion_report(y, p, 40)  # counted from the examples, without the matrix
    assert _from_matrix(confusion_matrix(y, p, 40)) == (report["top_confusions"], report["per_class_accuracy"])


def test_without_matplotlib_runs_go_on_and_say_once_where_the_plots_would_be(tmp_path, monkeypatch):
    # "matplotlib" itself always (it may not be loaded yet when this test runs first), and every loaded submodule,
    # which an import would otherwise find in sys.modules without looking at its parent.
    for name in ["matplotlib", *[m for m in sys.modules if m.startswith("matplotlib.")]]:
        monkeypatch.setitem(sys.modules, name, None)  # import matplotlib... raises ImportError
    said = []
    assert write_plots(tmp_path, _run_records(), say=said.append) == []
    assert write_plots(tmp_path, _run_records(), say=said.append) == []
    assert len(said) == 1 and "matplotlib is not installed" in said[0] and str(tmp_path / "lr.png") in said[0]
    assert error_bar_plot(tmp_path / "sub" / "e.png", {"a": [(1, 0.5, 0.4, 0.6)]}, "t", "x", "y",
                          say=said.append) is None
    assert len(said) == 2 and str(tmp_path / "sub" / "e.png") in said[1]
    assert not list(tmp_path.rglob("*.png"))


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_metrics_csv_holds_the_same_records_and_follows_a_resume(tmp_path):
    records = _run_records()
    with MetricsLog(tmp_path) as log:
        for r in records:
            log.log(r)
    assert read_jsonl(tmp_path / "metrics.jsonl") == records
    rows = _csv_rows(tmp_path / "metrics.csv")
    assert list(rows[0])[:2] == ["step", "loss"] and "eval_top1" in rows[0] and "eval_per_class_accuracy" not in rows[0]
    assert len(rows) == len(records)
    for row, r in zip(rows, records, strict=True):
        assert int(row["step"]) == r["step"]
        if "eval" in r:
            assert float(row["eval_top1"]) == r["eval"]["top1"] and row["loss"] == ""
        else:
            assert float(row["loss"]) == r["loss"] and float(row["lr"]) == r["lr"] and row["eval_top1"] == ""
    with MetricsLog(tmp_path, keep_until_step=3) as log:  # resumed from the state of step 3
        log.log({"step": 4, "loss": 0.125, "lr": 0.5})
    rows = _csv_rows(tmp_path / "metrics.csv")
    assert [(row["step"], row["loss"]) for row in rows][-2:] == [("3", ""), ("4", "0.125")]
    assert len(rows) == len(read_jsonl(tmp_path / "metrics.jsonl")) == 5


def test_tensorboard_log_reads_back_and_a_resume_hides_what_came_after(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLog(tmp_path, tensorboard=True) as log:
        for r in _run_records():
            log.log(r)
    with MetricsLog(tmp_path, keep_until_step=3, tensorboard=True) as log:  # steps 4-6 again, other losses
        for s in (4, 5, 6):
            log.log({"step": s, "loss": 10.0 + s, "lr": 0.01})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/lr", "eval/top1", "eval/loss"} <= set(acc.Tags()["scalars"])
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert loss == pytest.approx({1: 2.0, 2: 1.0, 3: 2 / 3, 4: 14.0, 5: 15.0, 6: 16.0})
    top1 = acc.Scalars("eval/top1")
    assert [e.step for e in top1] == [3] and top1[0].value == pytest.approx(0.2)  # step 6's was purged


def test_tensorboard_missing_is_a_setup_error_saying_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(SetupError, match=r"pip install 'bigtransfer\[tensorboard\]'"):
        MetricsLog(tmp_path, tensorboard=True)
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before anything was written
