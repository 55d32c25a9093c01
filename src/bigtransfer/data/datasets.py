"""Training data for fine-tuning: find, check and split the examples, then serve them to a DataLoader.

Flow: `load_splits(source)` reads an image folder, a train/ + val/ (or test/) folder, a CSV/JSONL manifest or an
.npz (see `bigtransfer.data.sources`), decodes every image once (thread pool) so that unreadable ones are named and
dropped before training (``strict=True``: refused), splits train per class when no evaluation split is given, and
optionally keeps a seeded, balanced K-shot subset. `ImageDataset` + `train_transform` / `eval_transform` +
`make_loader` turn the items into batches.

Reproducibility contract (for resuming mid-run): ``make_loader(ds, B, shuffle=True, seed=S, start_step=k,
batch_split=Q)`` yields, for every step s >= k, Q micro-batches of B/Q examples; which examples and how each one
is cropped and flipped is a function of (S, s) only (`bigtransfer.data.sampling`), so a loader restarted at step k
yields exactly what an uninterrupted loader yields from step k on. A file that goes bad after the up-front check
never stops a run: `ImageDataset` logs it once and serves the next readable item in its place.
"""

from __future__ import annotations

import logging
import math
import os
import random
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..core.errors import UserError
from ..core.paths import shown
from .images import ImageError, open_rgb
from .loaders import loader
from .sampling import StepSampler, batch_indices, sample_seed
from .sources import DataSourceError, find_examples, is_npz_row, npz_row
from .transforms import EvalTransform, TrainTransform, eval_transform, train_transform

__all__ = ["DataSourceError", "DataSplits", "EvalTransform", "ImageDataset", "Item", "Skipped", "StepSampler",
           "TrainTransform", "batch_indices", "dataset_splits", "default_workers", "describe_dataset", "eval_transform",
           "image_size_of", "load_splits", "make_loader", "sample_seed", "train_transform"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One example: an image file path (or "<npz>#<row>") and its class index."""

    source: str
    label: int


@dataclass
class Skipped:
    """An image left out because it could not be decoded."""

    path: str
    reason: str


@dataclass
class DataSplits:
    """The examples a run trains and evaluates on, and what was left out."""

    train: list[Item]
    eval: list[Item]
    classes: list[str]
    eval_name: str  # "val" or "test" (given by the source) or "split" (held out from train here)
    skipped: list[Skipped] = field(default_factory=list)
    ignored: int = 0
    notes: list[str] = field(default_factory=list)
    unused: dict[str, int] = field(default_factory=dict)  # explicit splits not used: val beside test
    opener: Callable[[str], Image.Image] | None = None  # reads an item's image when it is no file (torch Datasets)

    def class_counts(self) -> dict[str, list[int]]:
        """Images per class (in class order, zeros included) in train and in the evaluation split."""
        def per(items: list[Item]) -> list[int]:
            c = Counter(i.label for i in items)
            return [c.get(k, 0) for k in range(len(self.classes))]

        return {"train_per_class": per(self.train), "eval_per_class": per(self.eval)}

    def summary(self) -> str:
        """One paragraph: counts per split (every class counted, 0 too), skipped files with reasons, ignored files."""
        def counts(items: list[Item]) -> str:
            if not items:
                return "no images"
            c = Counter(i.label for i in items)
            per = [c.get(k, 0) for k in range(len(self.classes))]
            lo, hi = min(per), max(per)
            text = f"{len(items)} images ({lo} per class)" if lo == hi else f"{len(items)} images ({lo}-{hi} per class"
            empty = [shown(self.classes[k]) for k, n in enumerate(per) if n == 0]
            if empty:
                text += (f"; NONE of class{'es' * (len(empty) != 1)} {', '.join(empty[:10])}"
                         + (f" and {len(empty) - 10} more" if len(empty) > 10 else ""))
            return text if lo == hi else text + ")"

        names = ", ".join(shown(c) for c in self.classes[:10]) + (
            f", ... ({len(self.classes) - 10} more)" if len(self.classes) > 10 else "")
        evals = {"split": "held-out split of train", "val": "val", "test": "test"}[self.eval_name]
        parts = [f"{len(self.classes)} classes ({names}); train: {counts(self.train)}; {evals}: {counts(self.eval)}."]
        if self.skipped:
            listed = "; ".join(f"{shown(s.path)} ({s.reason})" for s in self.skipped)
            parts.append(f"Skipped {len(self.skipped)} unreadable image{'s' * (len(self.skipped) != 1)}: {listed}.")
        if self.ignored:
            parts.append(f"Ignored {self.ignored} hidden or non-image file{'s' * (self.ignored != 1)}.")
        parts.extend(self.notes)
        return " ".join(parts)


def default_workers() -> int:
    """Worker count used when none is given: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def _decode_problem(source: str) -> str | None:
    """None when the image decodes, else the reason it does not."""
    try:
        open_rgb(source)
    except ImageError as e:
        return e.reason
    return None


def _check(items: list[Item], workers: int, progress: bool) -> tuple[list[Item], list[Skipped]]:
    files = [it for it in items if not is_npz_row(it.source)]  # array rows are always decodable
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        reasons = pool.map(_decode_problem, [it.source for it in files])
        if progress:
            from tqdm import tqdm

            reasons = tqdm(reasons, total=len(files), desc="checking images", unit="img")
        bad = {it.source: r for it, r in zip(files, reasons, strict=True) if r is not None}
    return [it for it in items if it.source not in bad], [Skipped(s, r) for s, r in sorted(bad.items())]


def _by_class(items: list[Item]) -> dict[int, list[Item]]:
    groups: dict[int, list[Item]] = {}
    for it in sorted(items, key=lambda i: (i.label, i.source)):
        groups.setdefault(it.label, []).append(it)
    return groups


def stratified_split(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Hold out round(fraction * n) of each class (at least 1 when the class has 2 or more, never all)."""
    rng = random.Random(f"split:{seed}")
    train: list[Item] = []
    held: list[Item] = []
    for group in _by_class(items).values():
        rng.shuffle(group)
        n = len(group)
        k = 0 if n < 2 else min(n - 1, max(1, math.floor(fraction * n + 0.5)))
        held += group[:k]
        train += group[k:]
    return train, held


def _few_shot(items: list[Item], k: int, seed: int, classes: list[str], why: str) -> list[Item]:
    """k examples of every class, chosen by seed; ValueError naming every class with fewer than k."""
    groups = _by_class(items)
    short = [(c, len(groups.get(i, []))) for i, c in enumerate(classes) if len(groups.get(i, [])) < k]
    if short:
        listed = ", ".join(f"{shown(c)} ({n})" for c, n in short)
        raise DataSourceError(f"examples_per_class={k}: {len(short)} of {len(classes)} classes have fewer than {k} "
                              f"usable training images{why}: {listed}")
    rng = random.Random(f"kshot:{seed}")
    return [it for i in range(len(classes)) for it in rng.sample(groups[i], k)]


def _listed(names: list[str], limit: int = 10) -> str:
    return "; ".join(names[:limit]) + (f"; and {len(names) - limit} more" if len(names) > limit else "")


def _check_classes(source: str | Path, classes: list[str], train: list[Item], held: list[Item],
                   unreadable: Counter, eval_name: str) -> list[str]:
    """Refuse fewer than 2 classes or a class without any usable image; loud notes for classes half missing.

    A 1-class softmax is trivially perfect and a class with no image at all is an output nothing can train or
    measure: both stop the run. A class with evaluation images but no training image is kept, with a warning:
    fixed benchmark splits (VTAB-1k's 1000 training images for 397 SUN classes) legitimately miss classes that
    their test split has, and those test images then count as errors, as the benchmark defines.
    """
    name = shown(str(source))
    if len(classes) < 2:
        listed = f" ({', '.join(shown(c) for c in classes)})" if classes else ""
        raise DataSourceError(f"{name}: {len(classes)} class{'es' * (len(classes) != 1)}{listed}; a classifier "
                              "needs at least 2 classes")
    n_train, n_held = Counter(i.label for i in train), Counter(i.label for i in held)
    empty = [f"{shown(c)} ({unreadable[k]} unreadable)" for k, c in enumerate(classes) if not n_train[k] + n_held[k]]
    if empty:
        raise DataSourceError(f"{name}: {len(empty)} of {len(classes)} classes have no usable image at all: "
                              f"{_listed(empty)}. Remove the class (its folder or rows) or add images")
    notes = []
    untrained = [f"{shown(c)} ({n_held[k]} in {eval_name}, {unreadable[k]} unreadable)"
                 for k, c in enumerate(classes) if not n_train[k]]
    if untrained:
        notes.append(f"WARNING: {len(untrained)} of {len(classes)} classes have no usable training image, so the "
                     f"model never learns them and their {eval_name} images all count as errors: {_listed(untrained)}.")
    unmeasured = [shown(c) for k, c in enumerate(classes) if not n_held[k]]
    if held and unmeasured and eval_name != "split":
        notes.append(f"WARNING: {len(unmeasured)} of {len(classes)} classes have no {eval_name} image, so their "
                     f"accuracy is not measured: {_listed(unmeasured)}.")
    return notes


def _hold_out_and_pick(train: list[Item], held: list[Item], classes: list[str], split: bool, val_fraction: float,
                       seed: int, split_seed: int | None, examples_per_class: int | None) -> tuple[list[Item], list[Item]]:
    """(train, held): `val_fraction` of each class held out when the source has no evaluation split (`split`), then
    the K-shot subset of train. One rule for folders and Datasets, so the same images give the same run."""
    why = ""
    if split:
        train, held = stratified_split(train, val_fraction, seed if split_seed is None else split_seed)
        why = f" after holding out {val_fraction:.0%} per class for evaluation"
    if examples_per_class is not None:
        train = _few_shot(train, examples_per_class, seed, classes, why)
    return train, held


def load_splits(source: str | Path, *, val_fraction: float = 0.2, seed: int = 0, examples_per_class: int | None = None,
                strict: bool = False, check_images: bool = True, workers: int = 0, split_seed: int | None = None,
                progress: bool = False, prefer: str = "test") -> DataSplits:
    """Find, check and split a dataset; `seed` picks the K-shot subset (and the split unless split_seed is given).

    `workers` is the number of threads decoding images for the up-front check (0: automatic). `prefer`: the split
    evaluated on when the source has both val and test (see `bigtransfer.data.sources`).
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if examples_per_class is not None and examples_per_class < 1:
        raise UserError(f"examples_per_class must be >= 1, got {examples_per_class}")
    found = find_examples(source, prefer)
    index = {c: i for i, c in enumerate(found.classes)}
    train = _items(found.train, index)
    held = _items(found.eval, index) if found.eval is not None else []
    skipped: list[Skipped] = []
    unreadable: Counter = Counter()
    if check_images:
        train, bad_train = _check(train, workers, progress)
        held, bad_eval = _check(held, workers, progress)
        skipped = sorted(bad_train + bad_eval, key=lambda s: s.path)
        if strict and skipped:
            listed = "\n".join(f"  {shown(s.path)}: {s.reason}" for s in skipped)
            raise DataSourceError(f"{shown(str(source))}: {len(skipped)} unreadable image"
                                  f"{'s' * (len(skipped) != 1)} (strict mode refuses to train):\n{listed}")
        before = _items(found.train + (found.eval or []), index)
        unreadable = Counter(i.label for i in before) - Counter(i.label for i in train + held)
    notes = found.notes + _check_classes(source, found.classes, train, held, unreadable, found.eval_name)
    train, held = _hold_out_and_pick(train, held, found.classes, found.eval is None, val_fraction, seed, split_seed,
                                     examples_per_class)
    train.sort(key=lambda i: (i.label, i.source))
    held.sort(key=lambda i: (i.label, i.source))
    return DataSplits(train, held, found.classes, found.eval_name, skipped, found.ignored, notes, found.unused)


# ---------------------------------------------------------------- torch Datasets given in Python

def _pil_of(image: object, where: str) -> Image.Image:
    """An RGB PIL image from what a user's Dataset returns: a PIL image, or a CHW/HWC/HW tensor or array
    (uint8 0-255, or floating point 0-1)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, torch.Tensor | np.ndarray):
        a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
            a = a.transpose(1, 2, 0)  # CHW (torch's layout) to HWC
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3) or min(a.shape[:2]) < 1:
            raise UserError(f"{where}: an image tensor must be CHW, HWC or HW with 1 or 3 channels, got shape "
                            f"{tuple(image.shape)}")
        if a.dtype == np.uint8:
            pixels = a
        elif np.issubdtype(a.dtype, np.floating):
            if not np.isfinite(a).all() or a.min() < 0.0 or a.max() > 1.0:
                raise UserError(f"{where}: a floating-point image tensor must hold pixels in [0, 1] (as torchvision's "
                                f"ToTensor gives), got values from {a.min():g} to {a.max():g}")
            pixels = np.rint(a * 255.0).astype(np.uint8)
        else:
            raise UserError(f"{where}: an image tensor must be uint8 (0-255) or floating point (0-1), got {a.dtype}")
        return Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")
    raise UserError(f"{where}: expected (image, label) with a PIL image or an image tensor, got {type(image).__name__} "
                    "(a Dataset given to run_finetune returns (PIL image or tensor, int label); keep your own "
                    "normalisation out of it: BiT's transforms are applied to the raw pixels)")


def _label_of(value: object, where: str) -> int:
    if isinstance(value, torch.Tensor | np.ndarray) and value.ndim == 0:
        value = value.item()  # a 0-d tensor, as torch's default collation or a to-tensor target transform makes
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise UserError(f"{where}: a label must be an int class index >= 0, got {value!r}")
    return int(value)


class DatasetImages:
    """Reads the image of item "<part>#<index>" from the user's Dataset of that part (picklable for workers)."""

    def __init__(self, parts: dict[str, Dataset]) -> None:
        self.parts = parts

    def __call__(self, source: str) -> Image.Image:
        part, index = source.rsplit("#", 1)
        sample = self.parts[part][int(index)]
        return _pil_of(sample[0], f"{part} dataset item {index}")


def _dataset_labels(ds: Dataset, part: str) -> list[int]:
    """Every label of a Dataset: its `targets` when it has them (torchvision's datasets do), else one pass over it."""
    n = len(ds)
    targets = getattr(ds, "targets", None)
    if targets is not None and len(targets) == n:
        return [_label_of(t, f"{part} dataset targets[{i}]") for i, t in enumerate(targets)]
    labels = []
    for i in range(n):
        sample = ds[i]
        if not isinstance(sample, tuple | list) or len(sample) != 2:
            raise UserError(f"{part} dataset item {i}: expected a pair (image, label), got {type(sample).__name__}")
        labels.append(_label_of(sample[1], f"{part} dataset item {i}"))
    return labels


def describe_dataset(train: Dataset, val: Dataset | None = None) -> str:
    """How config.json names data given as Datasets: their types and sizes (a resume must match them)."""
    text = f"torch Dataset {type(train).__name__} ({len(train)} examples)"
    return text + (f" + validation Dataset {type(val).__name__} ({len(val)} examples)" if val is not None else "")


def dataset_splits(train: Dataset, val: Dataset | None = None, *, val_fraction: float = 0.2, seed: int = 0,
                   examples_per_class: int | None = None, split_seed: int | None = None) -> DataSplits:
    """DataSplits over torch Datasets that return (PIL image or image tensor, int label), as `load_splits` for files.

    Class names: `train.classes` when it has them, else "0", "1", ... up to the largest label. Without `val`,
    `val_fraction` of each class is held out as for a folder. Items are named "train#<i>" / "val#<i>".
    """
    parts = {"train": train} if val is None else {"train": train, "val": val}
    labels = {}
    for part, ds in parts.items():
        if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
            raise UserError(f"the {part} data must be a path or a map-style torch Dataset (with __len__ and "
                            f"__getitem__), got {type(ds).__name__}")
        if len(ds) == 0:
            raise DataSourceError(f"the {part} Dataset is empty")
        labels[part] = _dataset_labels(ds, part)
        _pil_of(ds[0][0], f"{part} dataset item 0")  # a wrong image type stops here, not in a loader worker
    top = max(max(v) for v in labels.values())
    classes = [str(c) for c in getattr(train, "classes", None) or range(top + 1)]
    if top >= len(classes):
        raise DataSourceError(f"a label is {top}, but the train Dataset's classes name only {len(classes)} classes")
    items = {part: [Item(f"{part}#{i}", y) for i, y in enumerate(v)] for part, v in labels.items()}
    notes = _check_classes("the Dataset", classes, items["train"], items.get("val", []), Counter(),
                           "val" if val is not None else "split")
    train_items, held = _hold_out_and_pick(items["train"], items.get("val", []), classes, val is None, val_fraction,
                                           seed, split_seed, examples_per_class)
    for part in (train_items, held):  # by index, not by name: "train#10" sorts before "train#2"
        part.sort(key=lambda i: (i.label, int(i.source.rsplit("#", 1)[1])))
    return DataSplits(train_items, held, classes, "val" if val is not None else "split", notes=notes,
                      opener=DatasetImages(parts))


def _items(pairs: list[tuple[str, str]], index: dict[str, int]) -> list[Item]:
    return [Item(s, index[c]) for s, c in pairs]


def _image_size(source: str) -> tuple[int, int] | None:
    if is_npz_row(source):
        w, h = npz_row(source).size
        return h, w
    try:
        with Image.open(source) as img:  # reads the header only
            w, h = img.size
            return h, w
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def image_size_of(splits: DataSplits, sample: int = 64) -> tuple[int, int]:
    """Typical (h, w) of the training images: the medians over up to `sample` evenly spaced ones."""
    n = len(splits.train)
    if n == 0:
        raise DataSourceError("no training images to measure")
    k = max(1, min(sample, n))
    picks = sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})
    measure = _image_size if splits.opener is None else (lambda source: splits.opener(source).size[::-1])
    sizes = [s for s in (measure(splits.train[i].source) for i in picks) if s is not None]
    if not sizes:
        raise DataSourceError(f"could not read the size of any of {len(picks)} training images")
    return int(statistics.median_low(h for h, _ in sizes)), int(statistics.median_low(w for _, w in sizes))


Transform = Callable[[Image.Image, "torch.Generator | None"], torch.Tensor]


class ImageDataset(Dataset):
    """(CHW float32 tensor in [-1, 1], label) per item; keys are an index or (index, augmentation seed)."""

    def __init__(self, items: Sequence[Item], transform: Transform,
                 opener: Callable[[str], Image.Image] | None = None) -> None:
        self.items = list(items)
        self.transform = transform
        self.opener = opener  # DataSplits.opener: how to read items that are no files
        self._bad: set[str] = set()  # files found unreadable in this process; skipped without retrying

    def __len__(self) -> int:
        return len(self.items)

    def load(self, item: Item) -> Image.Image:
        """The RGB image of one item (raises ImageError when it cannot be decoded)."""
        if self.opener is not None:
            return self.opener(item.source)
        return npz_row(item.source) if is_npz_row(item.source) else open_rgb(item.source)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, aug_seed = key if isinstance(key, tuple) else (key, None)
        n = len(self.items)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        for offset in range(n):
            item = self.items[(index + offset) % n]
            if item.source in self._bad:
                continue
            try:
                img = self.load(item)
            except ImageError as e:
                self._bad.add(item.source)
                log.warning("%s; serving the next readable item in its place", e)
                continue
            gen = torch.Generator().manual_seed(aug_seed) if aug_seed is not None else None
            return self.transform(img, gen), item.label
        raise UserError(f"none of the {n} images of this dataset can be read any more")


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, workers: int | None = None, *,
                start_step: int = 0, steps: int | None = None, batch_split: int = 1,
                pin_memory: bool | None = None) -> DataLoader:
    """A DataLoader: shuffle=True gives the step-indexed training stream, False one ordered pass for evaluation.

    Training: for steps start_step, start_step + 1, ... (up to `steps`, exclusive; endless when None), yields
    batch_split micro-batches of batch_size / batch_split examples each (see the module docstring).
    """
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise UserError(f"workers must be >= 0, got {workers}")
    if shuffle:
        sampler = StepSampler(len(dataset), batch_size, seed, start_step, steps, batch_split)
        return loader(dataset, workers, pin_memory=pin_memory, batch_sampler=sampler)
    return loader(dataset, workers, pin_memory=pin_memory, batch_size=batch_size, shuffle=False)
