"""Packed image sets: every image decoded once into one uint8 array, augmented in batches on tensors.

Why: on a small CPU the pre-training input pipeline (decode a JPEG, crop and resize it with Pillow, one image at a
time in worker processes) competes with the model for the same cores. A packed set is decoded once (`pack`); a
training step then gathers its rows from a memory-mapped array and crops, resizes and flips the whole batch with one
`grid_sample` call in the training process, so no worker process is needed.

A packed set is a folder:

    packed.json         {"format": "bigtransfer-packed", "version": 1, "classes": [...], "multi_label": bool,
                         "num_samples": N, "height": H, "width": W, "source": ...}
    images.npy          uint8 (N, H, W, 3), RGB
    label_offsets.npy   int64 (N + 1,): example i has labels label_indices[offsets[i]:offsets[i + 1]]
    label_indices.npy   int32, class indices into "classes"

It is written into a hidden partial folder and renamed when complete, so a folder with packed.json is finished.
A corpus-style folder holds `train/` and optionally `val/` (or `test/`) packed sets.

`crop_flip_batch` resamples crop boxes bilinearly with `grid_sample`; with the boxes and flips that
`pretrain_data.InceptionCrop` draws, its values differ from Pillow's by rounding and, when a crop is shrunk, by
Pillow's antialiasing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import UserError
from .images import open_rgb
from .shards import ShardError, iter_shard, read_index

PACKED_NAME = "packed.json"
FORMAT = "bigtransfer-packed"
VERSION = 1


class PackedError(UserError):
    """A packed set that cannot be written or read; the message names the folder and the problem."""


@dataclass
class PackedSet:
    """An opened packed set: the memory-mapped images and the labels in CSR form."""

    root: Path
    classes: list[str]
    multi_label: bool
    images: np.ndarray  # (N, H, W, 3) uint8, memory-mapped
    offsets: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def labels(self, i: int) -> list[int]:
        """Class indices of example i."""
        return self.indices[self.offsets[i]:self.offsets[i + 1]].tolist()

    def targets(self, rows: Sequence[int]) -> torch.Tensor:
        """(len(rows), classes) multi-hot float targets."""
        out = torch.zeros(len(rows), len(self.classes))
        for r, i in enumerate(rows):
            out[r, self.labels(i)] = 1.0
        return out

    def pixels(self, rows: Sequence[int]) -> torch.Tensor:
        """(len(rows), 3, H, W) uint8 images, gathered from the array in the given order."""
        return torch.from_numpy(np.ascontiguousarray(self.images[np.asarray(rows, dtype=np.int64)])).permute(0, 3, 1, 2)


def is_packed(root: str | Path) -> bool:
    """True when `root` is a finished packed set."""
    return (Path(root) / PACKED_NAME).is_file()


def find_packed_sets(source: str | Path) -> tuple[Path, Path | None] | None:
    """(training set, held-out set or None) when `source` is a packed set or holds train/ + val|test/ ones."""
    root = Path(source)
    if is_packed(root):
        return root, None
    if is_packed(root / "train"):
        held = next((root / n for n in ("val", "test") if is_packed(root / n)), None)
        return root / "train", held
    return None


def open_packed(root: str | Path) -> PackedSet:
    """Open a packed set read-only (images memory-mapped), checking that its arrays agree with packed.json."""
    root = Path(root)
    meta_path = root / PACKED_NAME
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r}, expected {FORMAT!r} "
                             f"version {VERSION}")
        classes = [str(c) for c in meta["classes"]]
        n = int(meta["num_samples"])
        # allow_pickle=False: these files hold plain arrays only, never objects.
        images = np.load(root / "images.npy", mmap_mode="r", allow_pickle=False)
        offsets = np.load(root / "label_offsets.npy", allow_pickle=False)
        indices = np.load(root / "label_indices.npy", allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PackedError(f"{root}: not a readable packed set ({e}); rebuild it with 'bigtransfer pack'") from None
    problems = []
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != n or images.shape[3] != 3:
        problems.append(f"images.npy is {images.dtype} {images.shape}, expected uint8 ({n}, H, W, 3)")
    if offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != len(indices) or np.any(np.diff(offsets) < 1):
        problems.append("label_offsets.npy does not give every example at least one label")
    if len(indices) and (indices.min() < 0 or indices.max() >= len(classes)):
        problems.append(f"label_indices.npy holds class indices outside 0..{len(classes) - 1}")
    if problems:
        raise PackedError(f"{root}: {'; '.join(problems)}; rebuild it with 'bigtransfer pack'")
    return PackedSet(root, classes, bool(meta.get("multi_label")), images, offsets, indices)


# ---------------------------------------------------------------- writing

def _shard_samples(root: Path) -> Iterator[tuple[bytes, list[int]]]:
    index = read_index(root)
    for path, (_, count) in zip(index.paths(), index.shards, strict=True):
        for _, data, labels in iter_shard(path, expected=count):
            yield data, labels


def pack_shards(source: str | Path, out: str | Path, size: int | None = None) -> Path:
    """Decode a shard set into a packed set at `out`; images of another size are squash-resized to `size`.

    Samples that do not decode are named in a warning by the shard reader or here, and left out.
    """
    source, out = Path(source), Path(out)
    if out.exists():
        raise PackedError(f"{out}: already exists; choose another output folder or delete it")
    index = read_index(source)
    first = next(_shard_samples(source), None)
    if first is None:
        raise ShardError(f"{source}: holds no readable sample")
    side = size or open_rgb(data=first[0]).width
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(index.num_samples, side, side, 3))
        offsets, indices, n = [0], [], 0
        for data, labels in _shard_samples(source):
            img = open_rgb(data=data)
            if img.size != (side, side):
                img = img.resize((side, side), resample=2)  # bilinear, the squash of `images.squash`
            images[n] = np.asarray(img, dtype=np.uint8)
            indices.extend(labels)
            offsets.append(len(indices))
            n += 1
        images.flush()
        del images
        if n != index.num_samples:  # skipped samples: shrink the array to what was read
            _truncate_rows(tmp / "images.npy", n, (side, side, 3))
        np.save(tmp / "label_offsets.npy", np.asarray(offsets, dtype=np.int64))
        np.save(tmp / "label_indices.npy", np.asarray(indices, dtype=np.int32))
        meta = {"format": FORMAT, "version": VERSION, "classes": index.classes, "multi_label": index.multi_label,
                "num_samples": n, "height": side, "width": side, "source": str(source.resolve())}
        (tmp / PACKED_NAME).write_text(json.dumps(meta, ensure_ascii=False) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 folders; give the result mkdir's permissions
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _truncate_rows(path: Path, n: int, row_shape: tuple[int, ...]) -> None:
    old = np.load(path, mmap_mode="r")
    new_path = path.with_suffix(".tmp.npy")
    new = np.lib.format.open_memmap(new_path, mode="w+", dtype=np.uint8, shape=(n, *row_shape))
    new[:] = old[:n]
    new.flush()
    del new, old
    os.replace(new_path, path)


# ---------------------------------------------------------------- batched augmentation

def _affine(box: tuple[int, int, int, int], width: int, height: int, flip: bool) -> list[list[float]]:
    """The `affine_grid` matrix that maps the output square onto pixel box (left, top, right, bottom).

    With align_corners=False, output pixel i of S has centre u = (2i + 1) / S - 1 and must sample the input at
    pixel centre left + (i + 0.5) (right - left) / S - 0.5, whose normalised coordinate is
    u (right - left) / W + (left + right) / W - 1 (likewise for rows); a flip negates u.
    """
    left, top, right, bottom = box
    sx = (right - left) / width
    return [[-sx if flip else sx, 0.0, (left + right) / width - 1.0],
            [0.0, (bottom - top) / height, (top + bottom) / height - 1.0]]


def crop_flip_batch(pixels: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], flips: Sequence[bool],
                    size: int) -> torch.Tensor:
    """Crop box i of uint8 image i (B, 3, H, W), resize it to size x size (bilinear), flip it where flips[i]: in [-1, 1]."""
    _, _, height, width = pixels.shape
    thetas = torch.tensor([_affine(box, width, height, flip) for box, flip in zip(boxes, flips, strict=True)])
    x = pixels.float().div_(127.5).sub_(1.0)
    grid = F.affine_grid(thetas, [len(thetas), 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def squash_batch(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Evaluation view of uint8 images (B, 3, H, W): squash-resized to size x size (antialiased), in [-1, 1]."""
    x = pixels.float().div_(127.5).sub_(1.0)
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
