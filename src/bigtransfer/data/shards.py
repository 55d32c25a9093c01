"""WebDataset-style tar shards: many labelled images per tar file, written once and read sequentially.

A shard set is a folder of `<prefix>-NNNNNN.tar` files plus `index.json` (classes, shard names and sample
counts). In a tar, a sample is the adjacent members `<key>.<png|jpg|...>` and `<key>.json`, the JSON holding
`{"labels": [class indices], ...meta}`. index.json is written last, so a folder without it is unfinished.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import random
import re
import tarfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..core.atomic import atomic_path, write_text
from ..core.errors import UserError
from .images import IMAGE_SUFFIXES, ImageError, open_rgb

INDEX_NAME = "index.json"
FORMAT = "bigtransfer-shards"
VERSION = 1
_IMAGE_EXTS = frozenset(s.lstrip(".") for s in IMAGE_SUFFIXES)
# Keys become tar member names `<key>.<ext>`; a dot would move the key/extension boundary.
_KEY_RE = re.compile(r"[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*")


class ShardError(UserError):
    """A shard set that cannot be written or read; the message names the file and the problem."""


class ShardWarning(UserWarning):
    """A corrupt sample or shard tail that was skipped while reading."""


def _is_index(x: object) -> bool:
    """An integer class index (NumPy's too); True/False and 1.0 are not: int() would quietly make them one."""
    return isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    """A tar header with fixed owner and time, so equal content gives byte-identical shards."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    return info, io.BytesIO(data)


class ShardWriter:
    """Write samples into numbered tar shards of at most `max_count` samples, then index.json."""

    def __init__(self, out_dir: str | Path, classes: list[str], prefix: str = "shard", max_count: int = 1000,
                 multi_label: bool = True, info: dict[str, Any] | None = None) -> None:
        self.out_dir = Path(out_dir)
        if not classes or len(set(classes)) != len(classes) or not all(isinstance(c, str) for c in classes):
            raise ShardError(f"{self.out_dir}: classes must be a non-empty list of distinct strings")
        if max_count < 1:
            raise ShardError(f"{self.out_dir}: max_count must be at least 1, got {max_count}")
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", prefix):
            raise ShardError(f"{self.out_dir}: shard prefix {prefix!r} may only hold letters, digits, '-' and '_'")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ShardError(f"{self.out_dir}: exists and is not a folder")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if (self.out_dir / INDEX_NAME).exists() or any(self.out_dir.glob(f"{prefix}-*.tar")):
            raise ShardError(f"{self.out_dir}: already holds a shard set; choose an empty folder")
        self.classes = list(classes)
        self.prefix = prefix
        self.max_count = max_count
        self.multi_label = multi_label
        self.info = dict(info or {})
        self._keys: set[str] = set()
        self._done: list[tuple[str, int]] = []
        self._tar: tarfile.TarFile | None = None
        self._pending: Any = None  # the atomic_path context of the shard being written
        self._count = 0
        self._closed = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open_shard(self) -> None:
        name = f"{self.prefix}-{len(self._done):06d}.tar"
        self._pending = atomic_path(self.out_dir / name)
        tmp = self._pending.__enter__()
        self._tar = tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT)
        self._name = name
        self._count = 0

    def _finish_shard(self) -> None:
        assert self._tar is not None
        self._tar.close()
        self._pending.__exit__(None, None, None)  # renames the temporary file onto the shard's name
        os.chmod(self.out_dir / self._name, 0o644)  # temporary files are private; a finished shard is not
        self._done.append((self._name, self._count))
        self._tar = None

    def write(self, key: str, image: bytes, labels: list[int], ext: str = "png", meta: dict | None = None) -> None:
        """Append one sample: encoded image bytes, its class indices and optional JSON metadata."""
        if self._closed:
            raise ShardError(f"{self.out_dir}: writer is closed")
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise ShardError(f"{self.out_dir}: sample key {key!r} may only hold letters, digits, '-', '_' and '/'")
        if key in self._keys:
            raise ShardError(f"{self.out_dir}: duplicate sample key {key!r}")
        ext = ext.lower().lstrip(".")
        if ext not in _IMAGE_EXTS:
            raise ShardError(f"{self.out_dir}: sample {key!r}: image extension {ext!r} is not an image format")
        if not image:
            raise ShardError(f"{self.out_dir}: sample {key!r}: empty image bytes")
        if not all(_is_index(x) for x in labels):
            raise ShardError(f"{self.out_dir}: sample {key!r}: labels {labels!r} must be integers (class indices)")
        labels = [int(x) for x in labels]
        if not labels or len(set(labels)) != len(labels) or not all(0 <= x < len(self.classes) for x in labels):
            raise ShardError(f"{self.out_dir}: sample {key!r}: labels {labels} must be distinct class indices "
                             f"in [0, {len(self.classes)})")
        if not self.multi_label and len(labels) != 1:
            raise ShardError(f"{self.out_dir}: sample {key!r}: a single-label set takes exactly one label")
        record = dict(meta or {})
        if "labels" in record:
            raise ShardError(f"{self.out_dir}: sample {key!r}: meta may not hold 'labels'")
        record = {"labels": labels, **record}
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        self._tar.addfile(*_tar_member(f"{key}.{ext}", image))
        self._tar.addfile(*_tar_member(f"{key}.json", json.dumps(record, sort_keys=True).encode()))
        self._keys.add(key)
        self._count += 1
        if self._count >= self.max_count:
            self._finish_shard()

    def close(self) -> list[Path]:
        """Finish the last shard, write index.json and return the shard paths."""
        if not self._closed:
            if self._tar is not None:
                self._finish_shard()
            index = {
                "format": FORMAT, "version": VERSION, "classes": self.classes, "multi_label": self.multi_label,
                "num_samples": sum(n for _, n in self._done),
                "shards": [{"name": name, "count": n} for name, n in self._done], "info": self.info,
            }
            write_text(self.out_dir / INDEX_NAME, json.dumps(index, indent=1) + "\n")
            os.chmod(self.out_dir / INDEX_NAME, 0o644)
            self._closed = True
        return [self.out_dir / name for name, _ in self._done]

    def abort(self) -> None:
        """Drop the shard in progress and every shard this writer finished; write no index."""
        if self._closed:
            return
        if self._tar is not None:
            self._tar.close()
            err = ShardError("aborted")
            self._pending.__exit__(ShardError, err, None)  # deletes the temporary file, renames nothing
            self._tar = None
        for name, _ in self._done:
            (self.out_dir / name).unlink(missing_ok=True)
        self._closed = True


@dataclass
class ShardIndex:
    """What index.json says about a shard set."""

    root: Path
    classes: list[str]
    shards: list[tuple[str, int]]  # (file name, sample count)
    multi_label: bool
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        """Samples over all shards."""
        return sum(n for _, n in self.shards)

    def paths(self) -> list[Path]:
        """Every shard file's path."""
        return [self.root / name for name, _ in self.shards]


def read_index(root: str | Path) -> ShardIndex:
    """Read and check a shard set's index.json."""
    root = Path(root)
    path = root / INDEX_NAME
    if not root.is_dir():
        raise ShardError(f"{root}: no such folder of shards")
    if not path.is_file():
        hint = f"; did you mean {root / 'train'}?" if (root / "train" / INDEX_NAME).is_file() else ""
        raise ShardError(f"{root}: no {INDEX_NAME} (not a shard set, or its build did not finish){hint}")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"format is {raw.get('format')!r}, expected {FORMAT!r}")
        classes = raw["classes"]
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise ValueError("'classes' must be a non-empty list of strings")
        shards = [(str(s["name"]), int(s["count"])) for s in raw["shards"]]
        multi_label = bool(raw["multi_label"])
        info = dict(raw.get("info") or {})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ShardError(f"{path}: corrupt index ({e})") from None
    for name, _ in shards:
        if "/" in name or not (root / name).is_file():
            raise ShardError(f"{path}: lists shard {name!r}, which is missing from {root}")
    return ShardIndex(root=root, classes=classes, shards=shards, multi_label=multi_label, info=info)


def _sample(path: Path, key: str, parts: dict[str, bytes]) -> tuple[str, bytes, list[int]] | None:
    """One sample from its tar members, or None (with a warning naming it) when it is unusable."""
    problem = None
    image_ext = next((e for e in parts if e.lower() in _IMAGE_EXTS), None)
    labels: list[int] = []
    if "json" not in parts:
        problem = "no .json member"
    elif image_ext is None:
        problem = "no image member"
    else:
        try:
            record = json.loads(parts["json"])
            labels = record["labels"]
            if not isinstance(labels, list) or not labels or not all(_is_index(x) for x in labels):
                raise ValueError(f"labels must be a non-empty list of class indices, got {labels!r}")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            problem = f"corrupt {key}.json ({e})"
    if problem:
        warnings.warn(f"{path}: sample {key!r}: {problem}; skipped", ShardWarning, stacklevel=3)
        return None
    return key, parts[image_ext], labels


def iter_shard(path: str | Path, expected: int | None = None) -> Iterator[tuple[str, bytes, list[int]]]:
    """Yield (key, image bytes, labels) for every sample of one shard, reading the tar front to back.

    With `expected` (the count index.json gives), a shard that ends early, e.g. cut at a member boundary,
    which tar itself cannot tell from a complete archive, is reported too.
    """
    path = Path(path)
    key: str | None = None
    parts: dict[str, bytes] = {}
    seen = 0  # samples met, usable or not
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, base = posixpath.split(member.name)
                stem, _, ext = base.partition(".")
                member_key = posixpath.join(folder, stem)
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if member_key != key:
                    if key is not None:
                        seen += 1
                        if sample := _sample(path, key, parts):
                            yield sample
                    key, parts = member_key, {}
                parts[ext] = data
    except FileNotFoundError:
        raise ShardError(f"{path}: no such shard") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        # A damaged tar cannot be re-synchronised: keep what came before, name what was lost.
        warnings.warn(f"{path}: unreadable after {seen} samples ({e}); rest of the shard skipped",
                      ShardWarning, stacklevel=2)
        return
    if key is not None:
        seen += 1
        if sample := _sample(path, key, parts):
            yield sample
    if expected is not None and seen != expected:
        warnings.warn(f"{path}: holds {seen} samples but index.json says {expected} (truncated or replaced?)",
                      ShardWarning, stacklevel=2)


def split_shards(shards: list[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """The shards that one DataLoader worker of one process reads: disjoint, covering and deterministic."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if num_workers < 1 or not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} is not in [0, num_workers={num_workers})")
    slot = rank * num_workers + worker
    return list(shards[slot::world_size * num_workers])


def derive_seed(*parts: object) -> int:
    """A 63-bit seed determined by the given values (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Items in a random order drawn from a buffer of `size` (exact shuffle when the stream fits)."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class ShardDataset(torch.utils.data.IterableDataset):
    """Stream (image CHW in [-1, 1], multi-hot target) from a shard set, split over processes and workers."""

    def __init__(self, root: str | Path, transform: Callable[[Image.Image, torch.Generator], torch.Tensor],
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 256) -> None:
        super().__init__()
        self.index = read_index(root)
        split_shards([], rank, world_size, 0, 1)  # validates rank and world_size now, not in a worker
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be at least 1, got {shuffle_buffer}")
        self.transform = transform
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0

    @property
    def classes(self) -> list[str]:
        """Label names; targets have one entry per name."""
        return self.index.classes

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shard order, sample order and augmentations the next iteration uses."""
        self.epoch = int(epoch)

    def shard_order(self) -> list[str]:
        """All shard names in this epoch's order (the same in every process)."""
        names = [name for name, _ in self.index.shards]
        random.Random(derive_seed("shards", self.seed, self.epoch)).shuffle(names)
        return names

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = split_shards(self.shard_order(), self.rank, self.world_size, worker, num_workers)
        counts = dict(self.index.shards)
        stream = ((name, *s) for name in mine for s in iter_shard(self.index.root / name, counts[name]))
        rng = random.Random(derive_seed("buffer", self.seed, self.epoch, self.rank, worker))
        gen = torch.Generator()
        n = len(self.index.classes)
        for shard, key, data, labels in _shuffled(stream, self.shuffle_buffer, rng):
            if not all(0 <= x < n for x in labels):
                warnings.warn(f"{self.index.root / shard}: sample {key!r}: labels {labels} outside [0, {n}); skipped",
                              ShardWarning, stacklevel=2)
                continue
            try:
                img = open_rgb(f"{self.index.root / shard}: sample {key!r}", data=data)
            except ImageError as e:
                warnings.warn(f"{e}; skipped", ShardWarning, stacklevel=2)
                continue
            # Augmentation randomness is keyed by the sample, not by the process or worker that reads it.
            gen.manual_seed(derive_seed("sample", self.seed, self.epoch, key))
            target = torch.zeros(n)
            target[labels] = 1.0
            yield self.transform(img, gen), target
