"""Frozen-feature evaluation: logistic regression optimum, agreement with scikit-learn, k-NN, feature cache, CLI."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from bigtransfer.cli import main
from bigtransfer.evaluation import features as features_mod
from bigtransfer.evaluation.features import extract_features
from bigtransfer.evaluation.linear import L2_GRID, fit_linear_probe, fit_logistic, knn_predict, validation_split
from bigtransfer.model.checkpoints import save_checkpoint
from bigtransfer.model.resnetv2 import ResNetV2


def _blobs(n_per_class=20, dim=5, classes=3, spread=0.5, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)) * 4
    y = np.repeat(np.arange(classes), n_per_class)
    return centers[y] + rng.normal(size=(len(y), dim)) * spread, y


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _objective_and_grad(w, b, x, y, l2):
    """Mean cross-entropy + l2/2 |W|^2 and its gradient, written out by hand (independent of the torch code)."""
    p = _softmax(x @ w.T + b)
    onehot = np.eye(w.shape[0])[y]
    loss = -np.log(p[np.arange(len(y)), y]).mean() + 0.5 * l2 * (w**2).sum()
    return loss, (p - onehot).T @ x / len(y) + l2 * w, (p - onehot).mean(axis=0)


def test_logistic_regression_reaches_the_optimum_on_a_separable_problem():
    x, y = _blobs()
    l2 = 1e-2
    m = fit_logistic(x, y, 3, l2)
    assert (m.predict(x) == y).all()
    loss, gw, gb = _objective_and_grad(m.weight, m.bias, x, y, l2)
    assert np.abs(gw).max() < 1e-6 and np.abs(gb).max() < 1e-6  # stationary point of a strictly convex objective
    rng = np.random.default_rng(1)
    for _ in range(5):  # and no nearby point is better
        dw, db = rng.normal(size=m.weight.shape) * 1e-3, rng.normal(size=m.bias.shape) * 1e-3
        assert _objective_and_grad(m.weight + dw, m.bias + db, x, y, l2)[0] > loss
    assert np.allclose(m.predict_proba(x).sum(axis=1), 1.0)


def test_logistic_regression_matches_scikit_learn():
    sklearn_lm = pytest.importorskip("sklearn.linear_model")
    x, y = _blobs(n_per_class=15, dim=6, classes=4, spread=2.0, seed=3)  # noisier classes than above
    l2 = 0.05
    ours = fit_logistic(x, y, 4, l2)
    # scikit-learn minimizes C * sum(CE) + |W|^2 / 2, the same objective scaled by C * n when C = 1 / (l2 * n).
    ref = sklearn_lm.LogisticRegression(C=1.0 / (l2 * len(y)), tol=1e-12, max_iter=10_000).fit(x, y)
    assert (ours.predict(x) == ref.predict(x)).all()
    assert np.abs(ours.predict_proba(x) - ref.predict_proba(x)).max() < 1e-4
    assert np.abs(ours.weight - ref.coef_).max() < 1e-4
    assert (ours.predict(x) == y).mean() == pytest.approx((ref.predict(x) == y).mean())


def test_knn_equals_a_hand_computed_vote():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    labels = np.array([0, 1, 1, 2])
    queries = np.array([[1.0, 0.2], [10.0, -1.0], [0.1, 1.0], [-3.0, 0.5]])
    # Cosine similarities of query 0 to the four rows: 0.981, 0.196, 0.832, -0.981.
    #   k=3 -> rows 0, 2, 1 -> votes class 1 twice -> 1.
    # Query 1 (10, -1): 0.995, -0.0995, 0.633, -0.995. k=2 -> rows 0 (class 0), 2 (class 1): a tie, broken by
    #   the larger similarity -> 0.
    # Query 2 (0.1, 1): nearest row 1 (0.995) -> k=1 -> 1.
    # Query 3 (-3, 0.5): -0.986, 0.164, -0.581, 0.986. k=3 -> rows 3 (2), 1 (1), 2 (1) -> 1.
    assert knn_predict(train, labels, queries[:1], 3, k=3).tolist() == [1]
    assert knn_predict(train, labels, queries[1:2], 3, k=2).tolist() == [0]
    assert knn_predict(train, labels, queries[2:3], 3, k=1).tolist() == [1]
    assert knn_predict(train, labels, queries[3:], 3, k=3).tolist() == [1]
    assert knn_predict(train, labels, queries[3:], 3, k=1).tolist() == [2]
    assert knn_predict(train, labels, queries, 3, k=100).tolist() == [1, 1, 1, 1]  # k capped at 4: class 1 has 2 votes
    # k=2 everywhere: query 0 ties rows 0 (class 0, 0.981) and 2 (class 1, 0.832) -> 0; query 1 -> 0 as above;
    # query 2: rows 1 and 2, both class 1 -> 1; query 3: rows 3 (class 2, 0.986) and 1 (class 1, 0.164) -> 2.
    # Scaling rows and queries changes nothing (cosine), nor does answering in chunks.
    assert knn_predict(train * 7.0, labels, queries * 0.1, 3, k=2, chunk=3).tolist() == [0, 0, 1, 2]


def test_validation_split_is_stratified_and_seeded():
    y = np.array([0] * 10 + [1] * 5 + [2])
    fit, val = validation_split(y, 0.2, seed=4)
    assert sorted(np.concatenate([fit, val]).tolist()) == list(range(len(y)))
    assert np.bincount(y[val], minlength=3).tolist() == [2, 1, 0]  # a class with one example stays in fit
    assert np.array_equal(val, validation_split(y, 0.2, seed=4)[1])


def test_linear_probe_chooses_l2_on_validation_and_refits():
    x, y = _blobs(n_per_class=10, dim=4, classes=3, spread=3.0, seed=5)
    probe, scale = fit_linear_probe(x, y, 3, seed=0)
    assert probe.l2_chosen_by == "validation" and set(probe.val_accuracy) == set(L2_GRID)
    best = max(probe.val_accuracy.values())
    assert probe.l2 == max(l2 for l2, a in probe.val_accuracy.items() if a == best)
    assert probe.model.weight.shape == (3, 4) and probe.model.l2 == probe.l2
    one_shot, _ = fit_linear_probe(x[::10], y[::10], 3)  # one example per class: nothing to validate on
    assert one_shot.l2_chosen_by == "default"


# ---- features and the evaluate command -------------------------------------------------------------------------

COLORS = {"red": (200, 30, 30), "green": (30, 190, 40), "blue": (40, 40, 210)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """train/ and test/ folders of noisy single-colour 24x24 images, plus one undecodable file in train/."""
    root = tmp_path_factory.mktemp("colors")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        for name, c in COLORS.items():
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                a = np.clip(np.array(c) + rng.normal(0, 30, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f"{i}.png")
    (root / "train" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return save_checkpoint(ResNetV2("R14x0.5", 3, zero_head=False), tmp_path_factory.mktemp("ck") / "m.safetensors")


def test_feature_cache_hits_and_misses(dataset, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = ResNetV2("R14x0.5", 3)
    files = sorted(str(p) for p in (dataset / "test").rglob("*.png"))
    first = extract_features(model, files, 32, cache=tmp_path, workers=0, device="cpu")
    assert not first.cache_hit and first.path.is_file() and first.features.shape == (9, model.feature_dim)

    def no_compute(*args, **kwargs):
        raise AssertionError("features were recomputed although they are cached")

    monkeypatch.setattr(features_mod, "embed_files", no_compute)
    second = extract_features(model, files, 32, cache=tmp_path, device="cpu")
    assert second.cache_hit and second.key == first.key
    assert np.array_equal(second.features, first.features) and np.array_equal(second.kept, first.kept)
    monkeypatch.undo()

    with torch.no_grad():
        model.stages[0][0].conv1.weight[0, 0, 0, 0] += 0.5  # a different checkpoint
    changed = extract_features(model, files, 32, cache=tmp_path, workers=0, device="cpu")
    assert not changed.cache_hit and changed.key != first.key
    assert not np.allclose(changed.features, first.features)
    assert not extract_features(model, files, 48, cache=tmp_path, workers=0, device="cpu").cache_hit  # resolution
    st = os.stat(files[0])
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the data changed on disk
    assert not extract_features(model, files, 32, cache=tmp_path, workers=0, device="cpu").cache_hit
    assert extract_features(model, files, 32, cache=tmp_path, workers=0, device="cpu").cache_hit


@pytest.mark.parametrize("method", ["linear", "knn"])
def test_cli_evaluate_end_to_end(method, dataset, checkpoint, tmp_path, capsys):
    args = ["evaluate", method, "--data", str(dataset), "--weights", str(checkpoint), "--resolution", "32",
            "--cache", str(tmp_path / "cache"), "--device", "cpu", "--workers", "0"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert res["method"] == method and res["eval_split"] == "test"
    assert res["eval_examples"] == 9 and res["train_examples"] == 18 and res["classes"] == ["blue", "green", "red"]
    assert res["top1"] == 1.0  # colours are trivially separable even with random features
    assert res["feature_cache"] == {"train": False, "eval": False}
    assert [s["path"].rsplit("/", 1)[-1] for s in res["skipped"]] == ["broken.png"]
    assert json.loads((tmp_path / "a" / "config.json").read_text())["method"] == method
    assert "broken.png" in capsys.readouterr().out  # the summary names the unreadable file

    assert main([*args, "--out", str(tmp_path / "b")]) == 0  # same weights, same files: features from the cache
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    assert again["feature_cache"] == {"train": True, "eval": True} and again["top1"] == res["top1"]

    assert main([*args, "--out", str(tmp_path / "c"), "--examples-per-class", "2", "--seed", "1"]) == 0
    few = json.loads((tmp_path / "c" / "results.json").read_text())
    assert few["train_examples"] == 6 and few["examples_per_class"] == 2
    assert few["feature_cache"]["eval"] is True  # the evaluation split does not move with the few-shot seed
