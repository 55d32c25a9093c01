"""Metrics against hand computations and scikit-learn; plots are real PNGs with the data where it belongs."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageColor

from bigtransfer.engine.metrics import (
    Evaluation,
    JsonlLogger,
    confusion_matrix,
    per_class_accuracy,
    read_jsonl,
    to_json,
    topk_correct,
)
from bigtransfer.engine.plots import PALETTE, confusion_plot, error_bar_plot, line_plot, nice_ticks


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


def test_nice_ticks():
    assert nice_ticks(0, 1) == [0, 0.25, 0.5, 0.75, 1.0]
    assert nice_ticks(0, 500) == [0, 100, 200, 300, 400, 500]
    assert nice_ticks(0.013, 0.087) == [0.02, 0.04, 0.06, 0.08]


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
