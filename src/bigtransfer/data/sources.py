"""Find a dataset's examples: an image folder, train/ + val/ or test/ folders, a CSV/JSONL manifest, or an .npz file.

Every reader returns a `Found`: (source, class name) pairs for the training examples, the same for an explicit
evaluation split when the source has one, the class list, and how many entries were ignored (hidden files and
non-image files in folders). When a source has both a validation and a test split, the score comes from test
(the paper reports on the official test split; spec section 5) and val is left for choosing settings, unless the
caller asks for val (`prefer="val"`: pre-training's held-out looks, which decide nothing about the final score).
Array rows are addressed as ``"<npz path>#<row>"`` for the ``images`` array and ``"<npz path>#<key>:<row>"`` for
``val_images`` / ``test_images``; `npz_row` reads one back.

Manifests are UTF-8 text; bytes that are not UTF-8 (a file name written in another encoding) are read with
"surrogateescape", so the name still opens the file it names (see `bigtransfer.core.paths`). A manifest may list an
image once; labels are strings or integers.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.errors import UserError
from ..core.paths import shown
from .images import is_image_path, to_rgb


class DataSourceError(UserError):
    """A dataset that cannot be read as given; the message names the file and the problem."""


@dataclass
class Found:
    """The raw examples of a source, before labels become indices and before any checking or splitting."""

    train: list[tuple[str, str]]
    eval: list[tuple[str, str]] | None  # None: no explicit evaluation split
    eval_name: str  # "val", "test", or "split" when the caller must split train
    classes: list[str]
    ignored: int = 0
    notes: list[str] = field(default_factory=list)
    # Explicit splits present but not used (name -> examples): val beside test when scoring on test.
    unused: dict[str, int] = field(default_factory=dict)


EVAL_SPLITS = ("val", "test")


def _pick_eval(present: list[str], prefer: str) -> str:
    """The explicit split to evaluate on: `prefer` when present, else the one there is."""
    if prefer not in EVAL_SPLITS:
        raise ValueError(f"prefer must be one of {', '.join(EVAL_SPLITS)}, got {prefer!r}")
    return prefer if prefer in present else present[0]


def _unused_note(where: object, used: str, unused: str, count: int) -> str:
    why = ("the score comes from the official test split, as the paper's does; val is for choosing settings"
           if used == "test" else "val is the held-out look; the test split stays untouched")
    return f"{where}: has both val and test; evaluating on {used} ({why}); the {count} {unused} examples are not used"


def natural_sorted(names: set[str] | list[str]) -> list[str]:
    """Class names in order: numerically when all are integers ("2" before "10"), else as strings."""
    names = sorted(set(names))
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return names


# ---- image folders ----------------------------------------------------------------------------------------------

def _scan_class_folders(root: Path) -> tuple[list[tuple[str, str]], list[str], int]:
    """(source, class) for every image under root/<class>/ (recursively), the classes, and the ignored count."""
    records: list[tuple[str, str]] = []
    classes: list[str] = []
    ignored = 0
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir():
            ignored += 1  # hidden entries and loose files at the top carry no class
            continue
        classes.append(entry.name)
        for dirpath, dirnames, filenames in os.walk(entry.path):
            hidden = [d for d in dirnames if d.startswith(".")]
            ignored += len(hidden)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if is_image_path(path):
                    records.append((path, entry.name))
                else:
                    ignored += 1
    return records, classes, ignored


def _read_folder(root: Path, prefer: str) -> Found:
    train_dir = root / "train"
    if train_dir.is_dir():
        evals = [name for name in EVAL_SPLITS if (root / name).is_dir()]
        train, classes, ignored = _scan_class_folders(train_dir)
        notes = []
        if not evals:
            notes.append(f"{root}: train/ has no val/ or test/ beside it, so train/ is split")
            found = Found(train, None, "split", classes, ignored, notes)
        else:
            name = _pick_eval(evals, prefer)
            ev, ev_classes, ev_ignored = _scan_class_folders(root / name)
            if not ev:
                raise DataSourceError(f"{root / name}: no images in class sub-folders")
            unused = {}
            if len(evals) > 1:
                other = next(e for e in evals if e != name)
                unused[other] = len(_scan_class_folders(root / other)[0])
                notes.append(_unused_note(root, name, other, unused[other]))
            found = Found(train, ev, name, sorted(set(classes) | set(ev_classes)), ignored + ev_ignored, notes,
                          unused)
        root = train_dir
    else:
        train, classes, ignored = _scan_class_folders(root)
        found = Found(train, None, "split", classes, ignored)
    if not found.classes:
        raise DataSourceError(f"{root}: no class sub-folders (expected one folder of images per class)")
    if not found.train:
        raise DataSourceError(f"{root}: no image files in its class sub-folders ({len(found.classes)} folders)")
    return found


# ---- manifests --------------------------------------------------------------------------------------------------

_EVAL_SPLITS = {"val": "val", "validation": "val", "valid": "val", "test": "test"}


def manifest_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for every data row of a CSV or JSONL manifest."""
    rows: list[tuple[int, dict]] = []
    # Bytes that are not UTF-8 (a file name in another encoding) are kept as the OS's bytes, so such a name opens.
    text = path.read_text(encoding="utf-8-sig", errors="surrogateescape")
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        missing = {"path", "label"} - set(reader.fieldnames or [])
        if missing:
            raise DataSourceError(f"{path}: CSV header must have columns 'path' and 'label'; missing "
                                  f"{', '.join(sorted(missing))} (header: {', '.join(reader.fieldnames or []) or 'none'})")
        rows = [(reader.line_num, row) for row in reader]
    else:
        for num, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataSourceError(f"{path}, line {num}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataSourceError(f"{path}, line {num}: expected an object with keys 'path' and 'label'")
            rows.append((num, row))
    return rows


def is_label(value: object) -> bool:
    """True for what a manifest may give as a class: a string or an integer (JSON true/false, 1.0 or lists are not)."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def manifest_image(path: Path, num: int, src: object) -> str:
    """The image path of a manifest row: absolute, or joined to the manifest's folder; refuses a non-string."""
    if not isinstance(src, str) or not src.strip():
        raise DataSourceError(f"{path}, line {num}: 'path' must be a non-empty string, got {src!r}")
    src = src.strip()
    return src if os.path.isabs(src) else os.path.normpath(os.path.join(path.parent, src))


def refuse_repeats(path: Path, images: list[tuple[int, str]]) -> None:
    """Refuse a manifest that lists one image file twice: it would be trained on twice, or trained and scored on.

    `images` holds (line number, image path) per row; paths are compared after resolving symlinks and '..'.
    """
    first: dict[str, int] = {}
    repeats: list[str] = []
    for num, src in images:
        key = os.path.realpath(src)
        if key in first:
            repeats.append(f"line {num} repeats line {first[key]} ({shown(src)})")
        else:
            first[key] = num
    if repeats:
        listed = "; ".join(repeats[:5]) + (f"; and {len(repeats) - 5} more" if len(repeats) > 5 else "")
        raise DataSourceError(f"{shown(str(path))}: {len(repeats)} row{'s' * (len(repeats) != 1)} list an image an "
                              f"earlier row already lists (it would be trained on twice, or both trained and "
                              f"evaluated on): {listed}; remove the repeated rows")


def _read_manifest(path: Path, prefer: str) -> Found:
    train: list[tuple[str, str]] = []
    evals: dict[str, list[tuple[str, str]]] = {"val": [], "test": []}
    images: list[tuple[int, str]] = []
    for num, row in manifest_rows(path):
        src, label = row.get("path"), row.get("label")
        if src is None or str(src).strip() == "" or label is None or str(label).strip() == "":
            raise DataSourceError(f"{path}, line {num}: needs a non-empty 'path' and 'label'")
        if not is_label(label):
            raise DataSourceError(f"{path}, line {num}: 'label' must be a string or an integer, got {label!r}")
        full = manifest_image(path, num, src)
        images.append((num, full))
        split = str(row.get("split") or "train").strip().lower()
        if split == "train":
            train.append((full, str(label).strip()))
        elif split in _EVAL_SPLITS:
            evals[_EVAL_SPLITS[split]].append((full, str(label).strip()))
        else:
            raise DataSourceError(f"{path}, line {num}: split must be train, val or test, got {split!r}")
    if not train:
        raise DataSourceError(f"{path}: no training rows")
    refuse_repeats(path, images)
    notes, unused = [], {}
    present = [k for k in EVAL_SPLITS if evals[k]]
    name = _pick_eval(present, prefer) if present else "split"
    # The classes of the rows used: rows of the split left unused add none.
    classes = natural_sorted({c for _, c in train} | {c for _, c in evals.get(name, [])})
    if len(present) > 1:
        other = next(e for e in present if e != name)
        unused[other] = len(evals[other])
        notes.append(_unused_note(path, name, other, unused[other]))
    return Found(train, evals[name] if name != "split" else None, name, classes, 0, notes, unused)


# ---- arrays -----------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _npz_array(path: str, key: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as z:
        return z[key]


def _check_arrays(path: Path, images: np.ndarray, labels: np.ndarray, ikey: str, lkey: str) -> None:
    if images.dtype != np.uint8:
        raise DataSourceError(f"{path}: {ikey} must be uint8 pixels 0-255, got {images.dtype}")
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3, 4))):
        raise DataSourceError(f"{path}: {ikey} must have shape (N, H, W) or (N, H, W, 1|3|4), got {images.shape}")
    if 0 in images.shape[1:3]:
        raise DataSourceError(f"{path}: {ikey} has shape {images.shape}: images of zero height or width")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataSourceError(f"{path}: {lkey} must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise DataSourceError(f"{path}: {len(images)} {ikey} but {len(labels)} {lkey}")
    if len(labels) and labels.min() < 0:
        raise DataSourceError(f"{path}: {lkey} must be >= 0, found {labels.min()}")


def _class_names(path: Path, names: np.ndarray) -> list[str]:
    if names.ndim != 1:
        raise DataSourceError(f"{path}: class_names must be a 1-D array of names, got shape {names.shape}")
    return [str(n) for n in names]


def _check_label_range(path: Path, labels: np.ndarray, ev_labels: np.ndarray | None) -> None:
    """Without class_names, labels are class indices: 0..K-1, every one with examples.

    Checked before anything is sized by the largest label: one stray 100000 would otherwise make 100,001 classes.
    """
    present = np.unique(labels if ev_labels is None else np.concatenate([labels, ev_labels]))
    if present[-1] != len(present) - 1:
        raise DataSourceError(f"{path}: labels must be the class indices 0..K-1 with every class present; found "
                              f"{len(present)} distinct values from {present[0]} to {present[-1]} ({_preview(present)}),"
                              f" so {int(present[-1]) + 1 - len(present)} classes would have no example. Renumber "
                              "the labels 0..K-1, or add a class_names array naming every class")


def _preview(values: np.ndarray, n: int = 10) -> str:
    shown_values = ", ".join(str(int(v)) for v in values[:n])
    return shown_values + (f", ... ({len(values) - n} more)" if len(values) > n else "")


def _read_npz(path: Path, prefer: str) -> Found:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if not {"images", "labels"} <= keys:
                raise DataSourceError(f"{path}: needs arrays 'images' and 'labels'; has {', '.join(sorted(keys)) or 'none'}")
            names = _class_names(path, z["class_names"]) if "class_names" in keys else None
            labels = z["labels"]
            present = [k for k in EVAL_SPLITS if f"{k}_images" in keys and f"{k}_labels" in keys]
            ev_key = _pick_eval(present, prefer) if present else None
            unused = {k: len(z[f"{k}_labels"]) for k in present if k != ev_key}
            ev_labels = z[f"{ev_key}_labels"] if ev_key else None
    except DataSourceError:
        raise
    except (OSError, ValueError) as e:
        raise DataSourceError(f"{path}: cannot read as .npz ({e})") from None
    _check_arrays(path, _npz_array(str(path), "images"), labels, "images", "labels")
    if ev_key:
        _check_arrays(path, _npz_array(str(path), f"{ev_key}_images"), ev_labels, f"{ev_key}_images", f"{ev_key}_labels")
    if len(labels) == 0:
        raise DataSourceError(f"{path}: no training examples")
    top = int(max([labels.max(initial=-1)] + ([ev_labels.max(initial=-1)] if ev_key else [])))
    if names is None:
        _check_label_range(path, labels, ev_labels)
        names = [str(i) for i in range(top + 1)]
    elif top >= len(names):
        raise DataSourceError(f"{path}: label {top} but only {len(names)} class_names")
    elif len(set(names)) != len(names):
        repeated = sorted(n for n, k in Counter(names).items() if k > 1)
        raise DataSourceError(f"{path}: class_names repeats a name ({', '.join(repeated)})")
    train = [(f"{path}#{i}", names[int(c)]) for i, c in enumerate(labels)]
    ev = [(f"{path}#{ev_key}_images:{i}", names[int(c)]) for i, c in enumerate(ev_labels)] if ev_key else None
    notes = [_unused_note(path, ev_key, k, n) for k, n in unused.items()]
    return Found(train, ev, ev_key or "split", names, notes=notes, unused=unused)


_ROW = re.compile(r"^(?P<path>.+\.npz)#(?:(?P<key>\w+):)?(?P<row>\d+)$", re.IGNORECASE)


def is_npz_row(source: str) -> bool:
    """True when a source names a row of an .npz array rather than an image file."""
    return bool(_ROW.match(source))


def npz_row(source: str) -> Image.Image:
    """The RGB image stored at "<npz>#<row>" or "<npz>#<key>:<row>"."""
    m = _ROW.match(source)
    if not m:
        raise ValueError(f"{source}: not an array row")
    a = _npz_array(m["path"], m["key"] or "images")[int(m["row"])]
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    return to_rgb(Image.fromarray(np.ascontiguousarray(a)))  # uint8 (H, W) / (H, W, 3|4): L / RGB / RGBA


# ---- entry point ------------------------------------------------------------------------------------------------

def find_examples(source: str | os.PathLike, prefer: str = "test") -> Found:
    """Read any supported dataset source; raise DataSourceError naming the file when it cannot be used.

    `prefer` names the split evaluated on when the source has both val and test ("test": the score's split).
    """
    path = Path(source)
    if path.is_dir():
        return _read_folder(path, prefer)
    if not path.exists():
        raise DataSourceError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".jsonl"):
        return _read_manifest(path, prefer)
    if suffix == ".npz":
        return _read_npz(path, prefer)
    raise DataSourceError(f"{path}: not a dataset (expected an image folder, a .csv or .jsonl manifest, or an .npz)")
