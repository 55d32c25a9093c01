"""Frozen-feature classifiers: L2-regularized multinomial logistic regression (full-batch L-BFGS) and cosine k-NN."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.atomic import write_text
from ..core.errors import UserError
from ..core.runfolder import own_folder
from ..core.validate import check_out_folder
from ..data.datasets import DataSourceError, Item, image_size_of, load_splits, stratified_split
from ..deploy.inference import load_model
from ..engine.device import pick_device
from ..engine.metrics import confusion_report, to_json
from ..model.checkpoints import weights_digest
from ..model.preprocess import resolution_of
from ..transfer.hyperrule import resolution as hyperrule_resolution
from .config import DEFAULT_K, METHODS, VAL_FRACTION, FrozenEvalConfig  # noqa: F401 - re-exported
from .features import extract_features
from .protocol_runs import check_out_dir

# L2 strengths tried on the validation split (objective: mean cross-entropy + l2/2 * ||W||^2, standardized features).
L2_GRID: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
DEFAULT_L2 = 1e-3  # used when the training set is too small to hold out a validation split
# Problems up to this many feature values are solved in float64 (exact optimum); larger ones in float32.
FLOAT64_LIMIT = 1 << 26
# Below this many feature values each L-BFGS step is microseconds of arithmetic, and waking extra CPU threads
# costs more than it saves (5x slower measured with 2 threads on a busy 2-core machine), so one thread is used.
SMALL_PROBLEM = 1 << 20


@contextlib.contextmanager
def _threads_for(numel: int, device: torch.device) -> Iterator[None]:
    """Run tiny CPU problems on one thread; leave everything else alone."""
    if device.type != "cpu" or numel >= SMALL_PROBLEM or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class LogisticModel:
    """A fitted multinomial logistic regression: logits = x @ weight.T + bias."""

    weight: np.ndarray  # (classes, dim)
    bias: np.ndarray  # (classes,)
    l2: float
    iterations: int
    grad_norm: float  # max |gradient| of the objective at the returned solution

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Class scores for rows of x."""
        return np.asarray(x, dtype=self.weight.dtype) @ self.weight.T + self.bias

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Softmax probabilities for rows of x."""
        z = self.logits(x)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The most likely class of each row."""
        return self.logits(x).argmax(axis=1)


def _check_xy(x: np.ndarray, y: np.ndarray, num_classes: int) -> None:
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"features must be (n, dim) and labels (n,), got {x.shape} and {y.shape}")
    if len(y) == 0:
        raise ValueError("no training examples")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), found {y.min()}..{y.max()}")


def logistic_objective(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                       l2: float) -> torch.Tensor:
    """Mean cross-entropy plus l2/2 times the squared norm of the weights (the bias is not penalized)."""
    return F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()


def fit_logistic(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float, max_iter: int = 1000,
                 tol: float = 1e-9, device: str | torch.device = "cpu") -> LogisticModel:
    """Minimize the L2-regularized multinomial logistic loss over all of x at once with L-BFGS."""
    x = np.asarray(x)
    y = np.asarray(y, dtype=np.int64)
    _check_xy(x, y, num_classes)
    if not l2 > 0:
        raise ValueError(f"l2 must be positive (the optimum is unbounded on separable data without it), got {l2}")
    dtype = torch.float64 if x.size <= FLOAT64_LIMIT else torch.float32
    xt = torch.as_tensor(x, dtype=dtype, device=device)
    yt = torch.as_tensor(y, device=device)
    w = torch.zeros(num_classes, x.shape[1], dtype=dtype, device=device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=dtype, device=device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, max_eval=max_iter * 2, history_size=20,
                            tolerance_grad=tol, tolerance_change=tol * 1e-3, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = logistic_objective(w, b, xt, yt, l2)
        loss.backward()
        return loss

    with _threads_for(xt.numel(), xt.device):
        opt.step(closure)
        closure()  # leaves the gradient at the solution in w.grad and b.grad
    grad = max(float(w.grad.abs().max()), float(b.grad.abs().max()))
    iterations = int(opt.state[w].get("n_iter", 0))
    return LogisticModel(w.detach().cpu().numpy(), b.detach().cpu().numpy(), l2, iterations, grad)


class Standardizer:
    """Per-dimension centring and scaling with statistics of the training features."""

    def __init__(self, x: np.ndarray) -> None:
        self.mean = x.mean(axis=0)
        std = x.std(axis=0)
        # Dimensions that are constant on the training set (dead ReLUs) are left unscaled.
        self.std = np.where(std > 1e-8, std, 1.0)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std


def validation_split(y: np.ndarray, fraction: float = VAL_FRACTION, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (fit, validation) row indices, split per class by the same rule the data module uses."""
    fit, val = stratified_split([Item(str(i), int(c)) for i, c in enumerate(y)], fraction, seed)
    return (np.array(sorted(int(i.source) for i in fit), dtype=np.int64),
            np.array(sorted(int(i.source) for i in val), dtype=np.int64))


@dataclass
class LinearResult:
    """What the linear probe chose and how it scored."""

    l2: float
    l2_chosen_by: str  # "validation" or "default"
    val_accuracy: dict[float, float] = field(default_factory=dict)
    model: LogisticModel | None = None


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, num_classes: int, seed: int = 0,
                     grid: tuple[float, ...] = L2_GRID, device: str | torch.device = "cpu") -> tuple[
                         LinearResult, Standardizer]:
    """Choose l2 on a held-out part of the training set, then refit on all of it (standardized features)."""
    train_x = np.asarray(train_x)
    train_y = np.asarray(train_y, dtype=np.int64)
    fit_rows, val_rows = validation_split(train_y, seed=seed)
    result = LinearResult(DEFAULT_L2, "default")
    if len(val_rows) and len(fit_rows):
        scale = Standardizer(train_x[fit_rows])
        fx, vx = scale(train_x[fit_rows]), scale(train_x[val_rows])
        for l2 in grid:
            model = fit_logistic(fx, train_y[fit_rows], num_classes, l2, device=device)
            result.val_accuracy[l2] = float((model.predict(vx) == train_y[val_rows]).mean())
        # Highest validation accuracy; ties go to the stronger regularization, which transfers more safely.
        best = max(result.val_accuracy.values())
        result.l2 = max(l2 for l2, acc in result.val_accuracy.items() if acc == best)
        result.l2_chosen_by = "validation"
    scale = Standardizer(train_x)
    result.model = fit_logistic(scale(train_x), train_y, num_classes, result.l2, device=device)
    return result, scale


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, query_x: np.ndarray, num_classes: int,
                k: int = DEFAULT_K, chunk: int = 4096) -> np.ndarray:
    """Majority vote of the k most cosine-similar training rows; ties go to the larger summed similarity."""
    train_y = np.asarray(train_y, dtype=np.int64)
    _check_xy(np.asarray(train_x), train_y, num_classes)
    if k < 1:
        raise UserError(f"k must be at least 1, got {k}")
    k = min(k, len(train_y))
    bank = F.normalize(torch.as_tensor(np.asarray(train_x), dtype=torch.float64), dim=1)
    labels = torch.as_tensor(train_y)
    out = []
    for start in range(0, len(query_x), chunk):
        q = F.normalize(torch.as_tensor(np.asarray(query_x[start:start + chunk]), dtype=torch.float64), dim=1)
        sims, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes, dtype=torch.float64).scatter_add_(
            1, labels[idx], torch.ones_like(sims))
        sim_sum = torch.zeros(len(q), num_classes, dtype=torch.float64).scatter_add_(1, labels[idx], sims)
        # Similarities lie in [-1, 1], so k * 2 + 1 keeps the vote count dominant: sim_sum only breaks ties.
        score = votes * (2 * k + 1) + sim_sum
        score[votes == 0] = -np.inf
        out.append(score.argmax(dim=1))
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------- the frozen-feature protocol

# The settings that change a result: OUT holding results of other values is refused unless overwrite is set.
FROZEN_SETTINGS = ("method", "data", "model", "weights", "examples_per_class", "seed", "resolution", "k", "precision",
                   "val_fraction")


def run_frozen_eval(config: FrozenEvalConfig, say: Callable[[str], None] = print) -> dict:
    """Extract (or reuse cached) pre-logits, fit the linear probe or k-NN, score on the eval split, write OUT."""
    c = dataclasses.replace(config)
    c.validate()
    # Absolute paths in config.json, so the record still says what was evaluated when read from elsewhere.
    for name in ("data", "out", "weights", "cache"):
        if getattr(c, name) is not None:
            setattr(c, name, str(Path(getattr(c, name)).expanduser().absolute()))
    check_out_folder(c.out)
    if not c.overwrite:  # results of other settings are not replaced silently, as finetune does for its runs
        check_out_dir(Path(c.out), c, FROZEN_SETTINGS, what="results")
    if c.cache is not None and c.use_cache:
        check_out_folder(c.cache, flag="--cache")
    with own_folder(c.out, "output folder"):
        return _frozen_eval(c, say)


def _frozen_eval(c: FrozenEvalConfig, say: Callable[[str], None]) -> dict:
    # Imported here: the classifiers above need none of the data, model or file machinery.

    out = Path(c.out)
    t0 = time.perf_counter()
    # The evaluation split must not move with the few-shot seed, so it is drawn with a fixed split seed.
    splits = load_splits(c.data, seed=c.seed, split_seed=0, examples_per_class=c.examples_per_class,
                         val_fraction=c.val_fraction, progress=False)
    if not splits.eval:
        raise DataSourceError(f"{c.data}: no evaluation examples")
    say(splits.summary())
    model = load_model(c.model, c.weights)
    # The resolution the checkpoint records (its fine-tuning's evaluation crop), else the HyperRule's for this data.
    size = c.resolution or (resolution_of(model.data_config) if model.data_config else
                            hyperrule_resolution(image_size_of(splits))[1])
    # Written once the data and the model are known to load, so a mistyped command leaves no folder behind.
    write_text(out / "config.json", to_json(dataclasses.asdict(c), indent=2) + "\n")
    cache = (c.cache or True) if c.use_cache else False
    digest = weights_digest(model)
    common = dict(cache=cache, precision=c.precision, batch_size=c.batch, workers=c.workers, device=c.device,
                  weights=digest, engine=c.engine)
    t1 = time.perf_counter()
    train = extract_features(model, [i.source for i in splits.train], size, progress=True, **common)
    test = extract_features(model, [i.source for i in splits.eval], size, progress=True, **common)
    t2 = time.perf_counter()
    for name, fs in (("train", train), ("eval", test)):
        say(f"{name} features: {fs.features.shape[0]} x {fs.features.shape[1]} at {size}px "
            f"({'from the cache' if fs.cache_hit else 'computed'}{f', {fs.path}' if fs.path else ''})")
    train_y = np.array([splits.train[i].label for i in train.kept], dtype=np.int64)
    eval_y = np.array([splits.eval[i].label for i in test.kept], dtype=np.int64)
    n_classes = len(splits.classes)
    result: dict = {"method": c.method}
    if c.method == "linear":
        probe, scale = fit_linear_probe(train.features, train_y, n_classes, seed=c.seed, device=pick_device(c.device))
        preds = probe.model.predict(scale(test.features))
        result.update(l2=probe.l2, l2_chosen_by=probe.l2_chosen_by,
                      val_accuracy={f"{k:g}": v for k, v in probe.val_accuracy.items()},
                      lbfgs_iterations=probe.model.iterations, grad_norm=probe.model.grad_norm)
    else:
        preds = knn_predict(train.features, train_y, test.features, n_classes, k=c.k)
        result.update(k=min(c.k, len(train_y)))
    t3 = time.perf_counter()
    top1 = float((preds == eval_y).mean()) if len(eval_y) else float("nan")
    result.update(
        top1=top1, eval_examples=int(len(eval_y)), eval_split=splits.eval_name, train_examples=int(len(train_y)),
        examples_per_class=c.examples_per_class, seed=c.seed, classes=splits.classes, resolution=size,
        model=c.model or model.arch.name, weights=c.weights, weights_sha256=digest,
        feature_dim=int(train.features.shape[1]),
        feature_cache={"train": train.cache_hit, "eval": test.cache_hit}, **splits.class_counts(),
        skipped=[{"path": s.path, "reason": s.reason} for s in [*splits.skipped, *train.skipped, *test.skipped]],
        **confusion_report(eval_y, preds, n_classes),
        seconds={"data": t1 - t0, "features": t2 - t1, "fit": t3 - t2, "total": t3 - t0},
    )
    write_text(out / "results.json", to_json(result, indent=2) + "\n")
    how = (f"l2 {result['l2']:g} chosen by {result['l2_chosen_by']}" if c.method == "linear"
           else f"k = {result['k']}, cosine similarity")
    say(f"{c.method}: top-1 {top1:.4f} on {len(eval_y)} {splits.eval_name} images ({how}); wrote {out / 'results.json'}")
    return result
