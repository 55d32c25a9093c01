"""The 19 VTAB-1k tasks as data, and a reader for a VTAB-1k copy laid out as ROOT/<task>/<split>.

Layout (any tool can produce it, e.g. from TFDS): for every task a folder ``ROOT/<task>`` holding the splits
``train800``, ``val200``, ``train800val200`` and ``test``, each either an image folder (one sub-folder per class)
or a CSV/JSONL manifest ``<split>.csv`` / ``<split>.jsonl`` with columns ``path`` and ``label`` (see
`bigtransfer.data.sources`). ``train800val200`` may be left out when ``train800`` and ``val200`` are there (it is then
their union). Task folders may use '-' or '_' in their names (``clevr-count`` or ``clevr_count``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import UserError
from ..core.paths import shown
from ..data.datasets import Item
from ..data.sources import DataSourceError, find_examples, natural_sorted

GROUPS = ("natural", "specialized", "structured")
SPLITS = ("train800", "val200", "train800val200", "test")
_MANIFEST_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True)
class VtabTask:
    """One VTAB-1k task: its group, label count, and whether training may flip or crop its images."""

    name: str
    group: str
    num_classes: int
    flip: bool = True
    crop: bool = True


# Groups and flip/crop flags from the spec (section 5); label counts are those of the VTAB benchmark's tasks.
TASKS: tuple[VtabTask, ...] = (
    VtabTask("caltech101", "natural", 102),
    VtabTask("cifar100", "natural", 100),
    VtabTask("dtd", "natural", 47),
    VtabTask("oxford_flowers102", "natural", 102),
    VtabTask("oxford_iiit_pet", "natural", 37),
    VtabTask("sun397", "natural", 397),
    VtabTask("svhn", "natural", 10),
    VtabTask("patch_camelyon", "specialized", 2),
    VtabTask("eurosat", "specialized", 10),
    VtabTask("resisc45", "specialized", 45),
    VtabTask("diabetic_retinopathy", "specialized", 5),
    VtabTask("clevr-count", "structured", 8, crop=False),
    VtabTask("clevr-distance", "structured", 6, crop=False),
    VtabTask("dmlab", "structured", 6, crop=False),
    VtabTask("kitti-distance", "structured", 4, crop=False),
    VtabTask("dsprites-location", "structured", 16, flip=False, crop=False),
    VtabTask("dsprites-orientation", "structured", 16, flip=False),
    VtabTask("smallnorb-azimuth", "structured", 18, flip=False),
    VtabTask("smallnorb-elevation", "structured", 9),
)


def _norm(name: str) -> str:
    return name.lower().replace("-", "_")


_BY_NAME = {_norm(t.name): t for t in TASKS}


def get_task(name: str) -> VtabTask:
    """The task called `name` ('-' and '_' are interchangeable)."""
    try:
        return _BY_NAME[_norm(name)]
    except KeyError:
        raise UserError(f"unknown VTAB task {name!r}; the 19 tasks are: {', '.join(t.name for t in TASKS)}") from None


@dataclass
class TaskData:
    """One task read from disk: items of every split (labels are indices into `classes`)."""

    task: VtabTask
    folder: Path
    splits: dict[str, list[Item]]
    classes: list[str]
    sources: dict[str, str]  # split -> the folder or manifest it was read from ("train800 + val200" if derived)
    ignored: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class VtabData:
    """The tasks found under a root, and the tasks that are missing or unusable (with the reason)."""

    root: Path
    tasks: list[TaskData]
    missing: list[tuple[str, str]]
    unknown: list[str] = field(default_factory=list)  # folders under root that are not VTAB tasks

    def report(self) -> str:
        """A short human-readable account: found tasks with their split sizes, missing ones with reasons."""
        lines = [f"VTAB-1k at {self.root}: {len(self.tasks)} of {len(TASKS)} tasks found"]
        for t in self.tasks:
            sizes = ", ".join(f"{s} {len(t.splits[s])}" for s in SPLITS)
            lines.append(f"  {t.task.name:22s} {t.task.group:12s} {len(t.classes):4d} classes; {sizes}")
            lines.extend(f"    note: {n}" for n in t.notes)
        for name, why in self.missing:
            lines.append(f"  missing {name}: {why}")
        if self.unknown:
            lines.append(f"  ignored folders that are not VTAB tasks: {', '.join(self.unknown)}")
        return "\n".join(lines)


def _split_source(folder: Path, split: str) -> Path | None:
    """The folder or manifest holding `split` inside a task folder, if any."""
    if (folder / split).is_dir():
        return folder / split
    for suffix in _MANIFEST_SUFFIXES:
        if (folder / f"{split}{suffix}").is_file():
            return folder / f"{split}{suffix}"
    return None


def _task_folder(root: Path, task: VtabTask) -> Path | None:
    for name in dict.fromkeys((task.name, task.name.replace("-", "_"), task.name.replace("_", "-"))):
        if (root / name).is_dir():
            return root / name
    return None


def read_task(folder: Path, task: VtabTask) -> TaskData:
    """Read one task folder; DataSourceError (naming the folder) when a required split is absent or unreadable."""
    found: dict[str, list[tuple[str, str]]] = {}
    sources: dict[str, str] = {}
    ignored = 0
    notes: list[str] = []
    for split in SPLITS:
        src = _split_source(folder, split)
        if src is None:
            continue
        f = find_examples(src)
        # A split source is one split: rows a manifest marks val/test belong to it too.
        found[split] = f.train + (f.eval or [])
        sources[split] = str(src)
        ignored += f.ignored
    if "train800val200" not in found and "train800" in found and "val200" in found:
        found["train800val200"] = found["train800"] + found["val200"]
        sources["train800val200"] = "train800 + val200"
    absent = [s for s in SPLITS if s not in found]
    if absent:
        raise DataSourceError(f"{folder}: no {', '.join(absent)} (each split is a folder of class sub-folders "
                              f"or a <split>.csv / <split>.jsonl manifest)")
    names = natural_sorted({c for rows in found.values() for _, c in rows})
    if all(n.isdigit() for n in names):
        # Integer class names are the benchmark's label ids: keep them, so index i is label i of the task.
        classes = [str(i) for i in range(max(task.num_classes, int(names[-1]) + 1))]
    else:
        classes = names
    if len(classes) > task.num_classes:
        raise DataSourceError(f"{folder}: {len(classes)} classes, but {task.name} has {task.num_classes}")
    if len(classes) < task.num_classes:
        notes.append(f"{len(classes)} of {task.num_classes} classes occur in the files")
    index = {c: i for i, c in enumerate(classes)}
    splits = {s: [Item(p, index[c]) for p, c in found[s]] for s in SPLITS}
    for train_split, eval_split in (("train800", "val200"), ("train800val200", "test")):
        unseen = sorted({it.label for it in splits[eval_split]} - {it.label for it in splits[train_split]})
        if unseen:
            notes.append(f"{len(unseen)} classes of {eval_split} have no {train_split} example (their images count as "
                         f"errors): {', '.join(shown(classes[k]) for k in unseen[:10])}"
                         + (f" and {len(unseen) - 10} more" if len(unseen) > 10 else ""))
    for split, expected in (("train800", 800), ("val200", 200), ("train800val200", 1000)):
        if len(splits[split]) != expected:
            notes.append(f"{split} has {len(splits[split])} examples (VTAB-1k uses {expected})")
    return TaskData(task, folder, splits, classes, sources, ignored, notes)


def read_vtab(root: str | os.PathLike, tasks: list[str] | None = None) -> VtabData:
    """Read every (or each named) task under `root`; missing or unreadable tasks are listed, not fatal."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (expected ROOT/<task>/{{{','.join(SPLITS)}}})")
    wanted = [get_task(n) for n in tasks] if tasks else list(TASKS)
    out = VtabData(root, [], [])
    for task in wanted:
        folder = _task_folder(root, task)
        if folder is None:
            out.missing.append((task.name, f"no folder {root / task.name}"))
            continue
        try:
            out.tasks.append(read_task(folder, task))
        except DataSourceError as e:
            out.missing.append((task.name, str(e)))
    known = {_norm(t.name) for t in TASKS}
    out.unknown = sorted(p.name for p in root.iterdir()
                         if p.is_dir() and not p.name.startswith(".") and _norm(p.name) not in known)
    return out


def group_means(scores: dict[str, float]) -> dict[str, float]:
    """Mean score per group over the tasks present in `scores`, plus 'overall' (mean over all those tasks)."""
    out: dict[str, float] = {}
    for group in GROUPS:
        vals = [v for name, v in scores.items() if get_task(name).group == group]
        if vals:
            out[group] = sum(vals) / len(vals)
    if scores:
        out["overall"] = sum(scores.values()) / len(scores)
    return out
