"""Upstream pre-training data: multi-label examples, Inception-style augmentation, a per-rank global-batch sampler.

Determinism across world sizes: global step s is made of the examples `sampling.batch_indices(s, n, B, seed)`
(positions s*B .. s*B+B-1 of an endless stream of seeded per-epoch permutations), and example j of that batch is
augmented by a generator seeded with `sampling.sample_seed(seed, s, j)`. Rank r of W processes takes the contiguous
slice j in [r*B/W, (r+1)*B/W), cut into batch_split micro-batches. Nothing depends on r or W, so W processes see
exactly the images, crops and flips that one process sees, and a run resumed on another number of processes
continues the same stream.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ..core.errors import UserError
from ..core.paths import shown
from .datasets import DataSourceError, ImageDataset, Item, Skipped, load_splits
from .images import to_tensor
from .loaders import loader
from .packed import PackedSet, crop_flip_batch, find_packed_sets, open_packed, squash_batch
from .sampling import batch_indices, sample_seed
from .shards import INDEX_NAME, ShardDataset, read_index
from .sources import is_label, manifest_image, manifest_rows, natural_sorted, refuse_repeats
from .transforms import eval_transform

# Inception-style crop: area fraction and aspect-ratio ranges, and tries before the centred fallback.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10
# Extra views of pretrain --augment robust (after the crop and flip; measured on BiT-Mini's corpus, docs/models/BiT-Mini.md):
# a smooth elastic warp (4 x 4 normal noise x U(0, ELASTIC_MAX), bicubic-upsampled to a displacement field in
# grid units), a low-resolution copy (down to LOWRES_SIZES with antialiasing, then back up), greyscale, inversion.
ELASTIC_P, ELASTIC_MAX, ELASTIC_GRID = 0.5, 0.12, 4
LOWRES_P, LOWRES_SIZES = 0.3, (8, 24)
GREY_P, INVERT_P = 0.25, 0.2
# The augments with robust views and how each departs from the values above. "robust-small" is for downstream
# images far smaller than the corpus's: measured on 1,000-update A/Bs of BiT-Mini (docs/models/BiT-Mini.md), it
# grouped the demo's 8x8 digits better (nearest class mean at K=1 0.508 -> 0.567) and fine-tuned better at 1 shot.
ROBUST_AUGMENTS: dict[str, dict[str, Any]] = {
    "robust": {},
    "robust-small": {"elastic_p": 0.7, "lowres_p": 0.6, "lowres_sizes": (6, 16)},
}
LUMA = (0.299, 0.587, 0.114)
SPLITS = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}


@dataclass(frozen=True)
class Example:
    """One image (a file path or "<npz>#<row>") and the indices of all its labels."""

    source: str
    labels: tuple[int, ...]


@dataclass
class PretrainData:
    """Training and held-out examples over one class list; multi_label when some example has several labels."""

    train: list[Example]
    eval: list[Example]
    classes: list[str]
    multi_label: bool
    eval_name: str  # "val" / "test" (given by the source) or "split" (held out here)
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def train_count(self) -> int:
        """Number of training examples."""
        return len(self.train)

    def summary(self) -> str:
        """One line: classes, counts, labels per image, and what was left out."""
        per_image = sum(len(e.labels) for e in self.train) / max(1, len(self.train))
        held = {"split": "held out of train", "val": "val", "test": "test"}[self.eval_name]
        text = (f"{len(self.classes)} classes, {'multi' if self.multi_label else 'single'}-label "
                f"({per_image:.2f} labels per image); train {len(self.train)} images, {held} {len(self.eval)}")
        if self.skipped:
            text += f"; skipped {len(self.skipped)} unreadable: " + "; ".join(f"{shown(s.path)} ({s.reason})"
                                                                             for s in self.skipped)
        return " ".join([text + ".", *self.notes])


# ---------------------------------------------------------------- augmentation

def random_resized_crop_box(width: int, height: int, gen: torch.Generator | None,
                            scale: tuple[float, float] = CROP_SCALE) -> tuple[int, int, int, int]:
    """Inception-style crop (left, top, right, bottom): `scale` of the area (8-100%), aspect ratio 3/4 to 4/3."""
    area = width * height
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(CROP_TRIES):
        u = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        ratio = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(0, width - w + 1, (), generator=gen))
            top = int(torch.randint(0, height - h + 1, (), generator=gen))
            return left, top, left + w, top + h
    # No try fitted (a very elongated image): the largest centred crop within the ratio range.
    if width / height < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif width / height > CROP_RATIO[1]:
        w, h = int(round(height * CROP_RATIO[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


@dataclass(frozen=True)
class InceptionCrop:
    """Random-resized crop to size x size and a random horizontal flip, pixels in [-1, 1]; no MixUp.

    Called as ``transform(img, generator)`` like `bigtransfer.data.transforms`; draws: up to 10 (area, log-ratio)
    pairs until one fits, the crop's left and top, then the flip.
    """

    size: int
    augment: str = "bit"  # another name of ROBUST_AUGMENTS: then also its `robust_view`, drawn after the flip

    def __post_init__(self) -> None:
        if self.size < 1:
            raise UserError(f"resolution must be >= 1, got {self.size}")

    @staticmethod
    def draw(width: int, height: int, generator: torch.Generator | None) -> tuple[tuple[int, int, int, int], bool]:
        """(crop box, flip) for an image of width x height: the random draws of one call."""
        box = random_resized_crop_box(width, height, generator)
        return box, bool(torch.rand((), generator=generator) < 0.5)

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        box, flip = self.draw(img.width, img.height, generator)
        x = to_tensor(img.resize((self.size, self.size), Image.BILINEAR, box=box))
        x = x.flip(2) if flip else x
        return robust_view(x, generator, self.augment) if self.augment in ROBUST_AUGMENTS else x


@dataclass(frozen=True)
class ViewOdds:
    """The probabilities and sizes of one augment's robust views."""

    elastic_p: float
    elastic_max: float
    lowres_p: float
    lowres_sizes: tuple[int, int]
    grey_p: float
    invert_p: float


def view_odds(augment: str = "robust") -> ViewOdds:
    """The module's values (read now, so that tests may change them) with the augment's departures."""
    base = ViewOdds(ELASTIC_P, ELASTIC_MAX, LOWRES_P, LOWRES_SIZES, GREY_P, INVERT_P)
    return dataclasses.replace(base, **ROBUST_AUGMENTS[augment])


def robust_view(x: torch.Tensor, generator: torch.Generator | None, augment: str = "robust") -> torch.Tensor:
    """Augment="robust"'s extra view of one cropped image (3, S, S) in [-1, 1], every choice drawn from generator.

    Why: the corpus is crisp, colourful renders, while small downstream images are often blurry, grey, light on
    dark or hand-drawn. Draws, in order: three uniforms (low-res, grey, invert), the low-res side, the elastic
    coin, then its amplitude and field when it applies. Applied in that order: warp, low-res, grey, invert.
    """
    return robust_views(x[None], [generator], augment)[0]


@dataclass(frozen=True)
class _ViewDraws:
    """One image's robust-view choices: low-res side (or None), grey, invert, elastic field (or None)."""

    side: int | None
    grey: bool
    invert: bool
    field: torch.Tensor | None


def _draw_view(generator: torch.Generator | None, odds: ViewOdds) -> _ViewDraws:
    u = torch.rand(3, generator=generator).tolist()
    side = int(torch.randint(odds.lowres_sizes[0], odds.lowres_sizes[1] + 1, (), generator=generator))
    warp = None
    if float(torch.rand((), generator=generator)) < odds.elastic_p:
        amplitude = float(torch.rand((), generator=generator)) * odds.elastic_max
        warp = torch.randn(1, 2, ELASTIC_GRID, ELASTIC_GRID, generator=generator) * amplitude
    return _ViewDraws(side if u[0] < odds.lowres_p else None, u[1] < odds.grey_p, u[2] < odds.invert_p, warp)


def robust_views(x: torch.Tensor, generators: Sequence[torch.Generator | None],
                 augment: str = "robust") -> torch.Tensor:
    """`robust_view` of every image of a batch (N, 3, S, S), image i drawn from generators[i], computed per kind.

    The draws are made image by image in `robust_view`'s order; then each operation runs once over the images
    that drew it (the warps as one grid_sample, the low-res copies one call per side), which gives the same
    pixels as the per-image loop at a fraction of its Python and dispatch cost.
    """
    odds = view_odds(augment)
    draws = [_draw_view(g, odds) for g in generators]
    size = x.shape[-2:]
    y = x.clone()
    warped = [i for i, d in enumerate(draws) if d.field is not None]
    if warped:
        noise = torch.cat([draws[i].field for i in warped])
        shift = F.interpolate(noise, size=size, mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
        identity = F.affine_grid(torch.eye(2, 3)[None], [1, 3, *size], align_corners=False)
        y[warped] = F.grid_sample(y[warped], identity + shift, mode="bilinear", padding_mode="border",
                                  align_corners=False)
    for side in sorted({d.side for d in draws if d.side is not None}):
        rows = [i for i, d in enumerate(draws) if d.side == side]
        small = F.interpolate(y[rows], size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        y[rows] = F.interpolate(small, size=size, mode="bilinear", align_corners=False)
    grey = [i for i, d in enumerate(draws) if d.grey]
    if grey:
        y[grey] = (y[grey] * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True).expand(-1, 3, -1, -1)
    invert = torch.tensor([d.invert for d in draws], dtype=torch.bool)
    y[invert] = -y[invert]
    return y


def multi_hot(labels: Sequence[Sequence[int]], num_classes: int) -> torch.Tensor:
    """(N, C) float targets with 1 at every label of every example."""
    target = torch.zeros(len(labels), num_classes)
    for row, labs in enumerate(labels):
        target[row, list(labs)] = 1.0
    return target


class MultiLabelDataset(Dataset):
    """(image tensor, multi-hot target) per example; keys are an index or (index, augmentation seed)."""

    def __init__(self, examples: Sequence[Example], num_classes: int, transform) -> None:
        # Decoding, npz rows and unreadable-file handling are ImageDataset's; its "label" is our example number.
        self.images = ImageDataset([Item(e.source, i) for i, e in enumerate(examples)], transform)
        self.labels = [e.labels for e in examples]
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        x, i = self.images[key]
        return x, multi_hot([self.labels[i]], self.num_classes)[0]


# ---------------------------------------------------------------- sampling

class RankStepSampler(Sampler[list[tuple[int, int]]]):
    """This rank's micro-batches of (index, augmentation seed), step after step from start_step (see module doc)."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1,
                 batch_split: int = 1, start_step: int = 0, end_step: int | None = None) -> None:
        if n < 1:
            raise ValueError("cannot sample from an empty dataset")
        if global_batch < 1 or global_batch % (world_size * batch_split):
            raise UserError(f"global batch {global_batch} does not split into {world_size} process(es) x "
                             f"{batch_split} micro-batch(es); use a batch divisible by {world_size * batch_split}")
        self.n, self.batch, self.seed = n, global_batch, seed
        self.rank, self.split = rank, batch_split
        self.start, self.end = start_step, end_step
        self.per_rank = global_batch // world_size
        self.micro = self.per_rank // batch_split

    def step_keys(self, step: int) -> list[tuple[int, int]]:
        """(index, augmentation seed) of every example of global step `step`, in batch order."""
        # micro_batch=None: with replacement only when the global batch exceeds the data (see batch_indices).
        idx = batch_indices(step, self.n, self.batch, self.seed)
        return [(i, sample_seed(self.seed, step, j)) for j, i in enumerate(idx)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start
        while self.end is None or step < self.end:
            keys = self.step_keys(step)[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
            for q in range(self.split):
                yield keys[q * self.micro:(q + 1) * self.micro]
            step += 1

    def __len__(self) -> int:
        if self.end is None:
            raise TypeError("an endless sampler has no length; give end_step")
        return max(0, self.end - self.start) * self.split


@dataclass
class ShardData:
    """A WebDataset-style shard set to stream from, and optionally a held-out one (see `bigtransfer.data.shards`)."""

    train_root: Path
    eval_root: Path | None
    classes: list[str]
    multi_label: bool
    train_count: int
    eval_count: int
    eval_name: str = "val"
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: classes, shard counts, sample counts."""
        held = f"{self.eval_name} {self.eval_count} samples in {self.eval_root}" if self.eval_root else "no held-out set"
        return " ".join([f"{len(self.classes)} classes, {'multi' if self.multi_label else 'single'}-label shard set "
                         f"{self.train_root} with {self.train_count} samples; {held}.", *self.notes])


Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class PackedData:
    """A packed (pre-decoded) training set and optionally a held-out one (see `bigtransfer.data.packed`)."""

    train: PackedSet
    eval: PackedSet | None
    eval_name: str = "val"
    notes: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        """The class names (those of the training set)."""
        return self.train.classes

    @property
    def multi_label(self) -> bool:
        """Whether some example has several labels."""
        return self.train.multi_label

    @property
    def train_count(self) -> int:
        """Number of training examples."""
        return len(self.train)

    def summary(self) -> str:
        """One line: classes, counts, image size."""
        held = f"{self.eval_name} {len(self.eval)} images" if self.eval is not None else "no held-out set"
        _, height, width, _ = self.train.images.shape
        return " ".join([f"{len(self.classes)} classes, {'multi' if self.multi_label else 'single'}-label packed set "
                         f"{self.train.root} with {len(self.train)} images of {width}x{height}; {held}.", *self.notes])


def _load_packed(train_root: Path, eval_root: Path | None) -> PackedData:
    train = open_packed(train_root)
    held = open_packed(eval_root) if eval_root is not None else None
    if held is not None and held.classes != train.classes:
        raise DataSourceError(f"{eval_root}: its classes differ from those of {train_root}")
    notes = [] if held else [f"{train_root}: no val/ or test/ packed set beside it, so there is no held-out evaluation"]
    return PackedData(train, held, eval_root.name if eval_root else "val", notes)


def _packed_train_batches(data: PackedData, sampler: RankStepSampler, size: int,
                          augment: str = "bit") -> Iterator[Batch]:
    """Micro-batches cut from the packed array and augmented as one batch, in this process (no workers)."""
    for keys in sampler:
        rows = [i for i, _ in keys]
        gens = [torch.Generator().manual_seed(seed) for _, seed in keys]
        draws = [InceptionCrop.draw(data.train.images.shape[2], data.train.images.shape[1], g) for g in gens]
        x = crop_flip_batch(data.train.pixels(rows), [b for b, _ in draws], [f for _, f in draws], size)
        if augment in ROBUST_AUGMENTS:  # each image from its own generator, after the crop's draws as in InceptionCrop
            x = robust_views(x, gens, augment)
        yield x, data.train.targets(rows)


def _packed_eval_batches(held: PackedSet, size: int, batch: int, rank: int, world_size: int,
                         limit: int | None) -> Iterator[Batch]:
    rows = list(range(rank, min(len(held), limit) if limit else len(held), world_size))
    for k in range(0, len(rows), batch):
        part = rows[k:k + batch]
        yield squash_batch(held.pixels(part), size), held.targets(part)



def train_batches(data: PretrainData | ShardData | PackedData, size: int, global_batch: int, seed: int, rank: int,
                  world_size: int, batch_split: int, start_step: int, end_step: int, workers: int,
                  augment: str = "bit") -> Iterator[Batch]:
    """This rank's micro-batches (images, multi-hot targets) from update start_step on, batch_split per update.

    After the paper's random-resized crop and flip, an augment of ROBUST_AUGMENTS also applies its `robust_view`
    (pretrain --augment).

    Examples and manifests follow the world-size-independent global stream (module doc). Shard sets are streamed:
    each process reads its own shards, so the examples of a step depend on the number of processes (their order
    and augmentation are seeded, but a resumed run restarts the epoch it was in).
    """
    transform = InceptionCrop(size, augment)
    if isinstance(data, PackedData):
        sampler = RankStepSampler(data.train_count, global_batch, seed, rank, world_size, batch_split, start_step,
                                  end_step)
        yield from _packed_train_batches(data, sampler, size, augment)
        return
    if isinstance(data, PretrainData):
        sampler = RankStepSampler(len(data.train), global_batch, seed, rank, world_size, batch_split, start_step, end_step)
        dataset = MultiLabelDataset(data.train, len(data.classes), transform)
        yield from loader(dataset, workers, batch_sampler=sampler)
        return

    micro = global_batch // world_size // batch_split
    stream = ShardDataset(data.train_root, transform, seed=seed, rank=rank, world_size=world_size)
    shards = len(stream.index.shards)
    if shards < world_size * max(1, workers):
        raise DataSourceError(f"{data.train_root}: {shards} shard(s) cannot feed {world_size} process(es) x "
                              f"{max(1, workers)} worker(s); write more, smaller shards or use fewer workers")
    epoch = start_step * global_batch // max(1, data.train_count)
    needed = (end_step - start_step) * batch_split
    while needed > 0:
        stream.set_epoch(epoch)
        got = 0
        # A new loader per epoch (its workers copy the epoch), so workers are not kept alive in between.
        for batch in loader(stream, workers, persistent=False, batch_size=micro, drop_last=True):
            yield batch
            got += 1
            needed -= 1
            if needed == 0:
                return
        if got == 0:
            raise DataSourceError(f"{data.train_root}: process {rank} read no full micro-batch of {micro} in epoch "
                                  f"{epoch}; use a smaller batch or more samples per shard")
        epoch += 1


def eval_batches(data: PretrainData | ShardData | PackedData, size: int, batch: int, rank: int, world_size: int,
                 workers: int, limit: int | None = None) -> Iterable[Batch]:
    """This rank's share of the held-out set as (images, targets) batches: squash-resized, in a fixed order."""

    transform = eval_transform(size)
    if isinstance(data, PackedData):
        return [] if data.eval is None else _packed_eval_batches(data.eval, size, batch, rank, world_size, limit)
    if isinstance(data, PretrainData):
        n = min(len(data.eval), limit) if limit else len(data.eval)
        mine = [data.eval[i] for i in range(rank, n, world_size)]
        if not mine:
            return []
        # A new loader for every evaluation: workers kept between passes would serve no second pass.
        return loader(MultiLabelDataset(mine, len(data.classes), transform), workers, persistent=False,
                      batch_size=batch)
    if data.eval_root is None:
        return []

    stream = ShardDataset(data.eval_root, transform, rank=rank, world_size=world_size, shuffle_buffer=1)
    batches = loader(stream, min(workers, len(stream.index.shards)), persistent=False, batch_size=batch)
    if limit is None:
        return batches
    per_rank = math.ceil(limit / world_size / batch)
    return (b for i, b in zip(range(per_rank), batches, strict=False))


# ---------------------------------------------------------------- sources

def is_multi_label_manifest(path: str | Path) -> bool:
    """True for a .jsonl manifest whose rows carry a 'labels' list."""
    p = Path(path)
    if p.suffix.lower() != ".jsonl" or not p.is_file():
        return False
    with open(p, encoding="utf-8-sig", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    return '"labels"' in first


def _holdout(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded random round(fraction * n) of the examples (at least 1 when there are 2 or more) held out."""
    order = list(examples)
    random.Random(f"split:{seed}").shuffle(order)
    k = 0 if len(order) < 2 else min(len(order) - 1, max(1, math.floor(fraction * len(order) + 0.5)))
    return order[k:], order[:k]


def read_multi_label_manifest(path: str | Path, holdout: float = 0.05, seed: int = 0) -> PretrainData:
    """Read a JSONL manifest of {"path": image, "labels": [names], "split"?: train|val|test} rows.

    Paths are relative to the manifest's folder. Without val/test rows, a seeded `holdout` fraction of the
    training rows is held out for evaluation. Missing files are an error here; images are decoded only when used
    (an unreadable one is logged, named, and replaced by the next readable example): pre-training sets are large.
    """
    p = Path(path)
    rows: dict[str, list[tuple[str, list[str]]]] = {"train": [], "val": [], "test": []}
    images: list[tuple[int, str]] = []
    for num, row in manifest_rows(p):
        src, labels = row.get("path"), row.get("labels")
        full = manifest_image(p, num, src)
        if not isinstance(labels, list) or not all(is_label(x) and str(x).strip() for x in labels):
            raise DataSourceError(f"{p}, line {num}: 'labels' must be a list of class names (strings or integers), "
                                  f"got {labels!r}")
        split = SPLITS.get(str(row.get("split") or "train").strip().lower())
        if split is None:
            raise DataSourceError(f"{p}, line {num}: split must be train, val or test, got {row.get('split')!r}")
        if not os.path.isfile(full):
            raise DataSourceError(f"{p}, line {num}: image {shown(src.strip())!r} not found (looked for {shown(full)})")
        rows[split].append((full, [str(x).strip() for x in labels]))
        images.append((num, full))
    if not rows["train"]:
        raise DataSourceError(f"{p}: no training rows")
    refuse_repeats(p, images)
    classes = natural_sorted({lab for part in rows.values() for _, labs in part for lab in labs})
    if len(classes) < 2:
        raise DataSourceError(f"{p}: {len(classes)} class{'es' * (len(classes) != 1)} over all rows "
                              f"({', '.join(map(shown, classes)) or 'no row has a label'}); training needs at least 2")
    index = {c: i for i, c in enumerate(classes)}
    trained = {lab for _, labs in rows["train"] for lab in labs}
    untrained = [shown(c) for c in classes if c not in trained]

    def examples(part: str) -> list[Example]:
        return [Example(src, tuple(sorted({index[lab] for lab in labs}))) for src, labs in rows[part]]

    train, notes = examples("train"), []
    eval_name = "val" if rows["val"] else ("test" if rows["test"] else "split")
    if eval_name == "split":
        train, held = _holdout(train, holdout, seed)
        notes.append(f"{p}: no val/test rows, held out {len(held)} of {len(rows['train'])} training rows")
    else:
        held = examples(eval_name)
    if untrained:
        notes.append(f"WARNING: {len(untrained)} classes occur only in val/test rows, never in training: "
                     f"{', '.join(untrained[:10])}" + (f" and {len(untrained) - 10} more" if len(untrained) > 10 else ""))
    multi = any(len(e.labels) != 1 for e in train + held)
    return PretrainData(train, held, classes, multi, eval_name, notes=notes)


def find_shard_sets(source: str | Path) -> tuple[Path, Path | None] | None:
    """(training shard set, held-out shard set or None) when `source` is a shard set or holds train/ + val|test/ ones."""
    root = Path(source)
    if (root / INDEX_NAME).is_file():
        return root, None
    if (root / "train" / INDEX_NAME).is_file():
        held = next((root / n for n in ("val", "test") if (root / n / INDEX_NAME).is_file()), None)
        return root / "train", held
    return None


def _load_shards(train_root: Path, eval_root: Path | None) -> ShardData:
    index = read_index(train_root)
    if len(index.classes) < 2:
        raise DataSourceError(f"{train_root}: {len(index.classes)} class ({', '.join(index.classes)}); training "
                              "needs at least 2")
    notes = [] if eval_root else [f"{train_root}: no val/ or test/ shard set beside it, so there is no held-out "
                                  "evaluation (write one, or hold images out into a manifest)"]
    eval_count = 0
    if eval_root is not None:
        held = read_index(eval_root)
        if held.classes != index.classes:
            raise DataSourceError(f"{eval_root}: its classes differ from those of {train_root}")
        eval_count = held.num_samples
    return ShardData(train_root, eval_root, list(index.classes), index.multi_label, index.num_samples, eval_count,
                     eval_root.name if eval_root else "val", notes)


def load_pretrain_data(source: str | Path, holdout: float = 0.05, seed: int = 0,
                       check_images: bool = False) -> PretrainData | ShardData | PackedData:
    """Read a packed set, a shard set, a multi-label JSONL manifest, or any fine-tuning source (one label per image)."""
    packed = find_packed_sets(source)
    if packed is not None:
        return _load_packed(*packed)
    shards = find_shard_sets(source)
    if shards is not None:
        return _load_shards(*shards)
    if is_multi_label_manifest(source):
        return read_multi_label_manifest(source, holdout, seed)
    # The held-out look during pre-training is validation: it takes val when a source has both val and test.
    splits = load_splits(source, val_fraction=holdout, seed=seed, check_images=check_images, prefer="val")
    train = [Example(it.source, (it.label,)) for it in splits.train]
    held = [Example(it.source, (it.label,)) for it in splits.eval]
    return PretrainData(train, held, splits.classes, False, splits.eval_name, splits.skipped, splits.notes)
