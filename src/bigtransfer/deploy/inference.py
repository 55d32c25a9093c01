"""Batched prediction and embedding over image files; files that cannot be decoded are named and skipped."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..core.errors import UserError
from ..data.datasets import Skipped, default_workers
from ..data.images import ImageError, is_image_path, open_rgb, to_rgb
from ..data.sources import is_npz_row, npz_row
from ..data.transforms import eval_transform
from ..model.checkpoints import CheckpointError, infer_arch, read_checkpoint, read_metadata
from ..model.downloads import DownloadError, read_labels
from ..model.factory import create_model
from ..model.memory import check_fits, inference_bytes
from ..model.preprocess import create_transform, resolution_of, resolve_data_config
from ..model.registry import resolve
from ..model.resnetv2 import ResNetV2
from .engines import engine_device, runner

DEFAULT_BATCH = 32
# An input size: a square resolution in px (BiT's squash-resize and scaling) or a data config (bigtransfer.model.preprocess).
Size = int | Mapping[str, Any]


@dataclass(frozen=True)
class Prediction:
    """The top classes of one image: (class index, label name or None, softmax probability), best first."""

    path: str
    top: list[tuple[int, str | None, float]]

    @property
    def labels(self) -> list[str | None]:
        """The label names of the top classes, best first (None where the model names no classes)."""
        return [name for _, name, _ in self.top]

    @property
    def probs(self) -> list[float]:
        """The softmax probabilities of the top classes, best first."""
        return [p for _, _, p in self.top]


@dataclass
class Embeddings:
    """Pre-logits of the images that decoded, in input order, with the files they belong to."""

    features: np.ndarray  # (n, feature_dim) float32
    files: list[str]
    indices: list[int]  # position of each row's file in the input list
    skipped: list[Skipped]


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[Skipped]]:
    """Files named directly plus the image files found (recursively, sorted) in named directories."""
    files: list[Path] = []
    problems: list[Skipped] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_image_path(f))
            if not found:
                problems.append(Skipped(str(p), "directory holds no image files"))
            files.extend(found)
        elif p.is_file():
            files.append(p)  # named explicitly: tried whatever its suffix, so a bad file is reported, not ignored
        else:
            problems.append(Skipped(str(p), "no such file or directory"))
    return files, problems


def _transform(size: Size) -> tuple[Callable, int]:
    """(transform, square resolution) for a resolution or a data config."""
    if isinstance(size, Mapping):
        return create_transform(size), resolution_of(size)
    return eval_transform(size), size


def load_model(name: str | None, weights: str | os.PathLike | None) -> ResNetV2:
    """A model from a name (released or bundled weights) and/or a checkpoint file; random weights are refused."""
    if weights is not None:
        path = Path(weights)
        if name is None:
            meta = read_metadata(path) if path.suffix.lower() == ".safetensors" and path.is_file() else {}
            name = meta.get("arch") or infer_arch(read_checkpoint(path)[0], str(path)).name
            try:
                resolve(name)
            except UserError as e:
                raise CheckpointError(f"{path}: its metadata names the architecture {name!r}, which is not one "
                                      f"this version knows ({e}); pass --model to say which it is") from None
        return create_model(name, pretrained=path)
    if name is None:
        raise UserError("give --model NAME, --weights PATH, or both")
    if not resolve(name).has_weights:
        raise UserError(f"{name} has no weights of its own; pass --weights PATH (a checkpoint of this architecture)")
    return create_model(name)


def label_names(model: ResNetV2, name: str | None = None) -> tuple[list[str] | None, str | None]:
    """Class names from the checkpoint's metadata or the released label file; (None, why) when there are none."""
    if model.labels is not None and len(model.labels) == model.num_classes:
        return list(model.labels), None
    info = None
    if name is not None:
        try:
            info = resolve(name)
        except ValueError:
            info = None
    if info is None or info.labels is None:
        return None, "the checkpoint names no classes; showing class indices"
    try:
        labels = read_labels(info.labels, progress=False)
    except DownloadError as e:
        return None, f"label file unavailable ({e}); showing class indices"
    if len(labels) != model.num_classes:
        return None, f"the {info.labels} label file has {len(labels)} names for {model.num_classes} classes"
    return labels, None


class _ImageFiles(Dataset):
    """Decodes one file (or .npz row) per item; a failure comes back as its reason instead of a tensor."""

    def __init__(self, files: Sequence[str | os.PathLike], size: Size) -> None:
        self.files = [str(f) for f in files]
        self.transform = _transform(size)[0]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        source = self.files[i]
        try:
            return i, self.transform(npz_row(source) if is_npz_row(source) else open_rgb(source)), None
        except ImageError as e:
            return i, None, e.reason
        except OSError as e:  # unreadable (permissions, I/O error) rather than undecodable
            return i, None, f"cannot read ({e.strerror or e})"


def _collate(batch: list[tuple[int, torch.Tensor | None, str | None]]):
    good = [(i, x) for i, x, _ in batch if x is not None]
    bad = [(i, err) for i, x, err in batch if x is None]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, bad


def iter_image_batches(files: Sequence[str | os.PathLike], size: Size, batch_size: int = DEFAULT_BATCH,
                       workers: int | None = None, on_skip: Callable[[Skipped], None] | None = None,
                       progress: bool = False, desc: str = "images", pin_memory: bool = False,
                       ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(indices, images) batches of the decodable files, decoded in parallel worker processes, in input order."""
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise UserError(f"workers must be 0 or more, got {workers}")
    # Worker processes decode in parallel; a single file is not worth starting one.
    workers = (0 if len(files) <= 1 else min(default_workers(), len(files))) if workers is None else workers
    loader = DataLoader(_ImageFiles(files, size), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_collate, pin_memory=pin_memory)
    with tqdm(total=len(files), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for indices, images, bad in loader:
            for i, reason in bad:
                if on_skip is not None:
                    on_skip(Skipped(str(files[i]), reason))
            bar.update(len(indices) + len(bad))
            if images is not None:
                yield indices, images


def _run(model: ResNetV2, files: Sequence[str | os.PathLike], config: Size, features: bool, batch_size: int,
         workers: int | None, precision: str, device: str, progress: bool,
         on_skip: Callable[[Skipped], None] | None, engine: str = "torch",
         ) -> tuple[list[int], torch.Tensor | None, list[Skipped]]:
    dev = engine_device(engine, precision, device)
    size = _transform(config)[1]
    batch = min(batch_size, max(1, len(files)))
    check_fits(inference_bytes(model.arch, model.num_classes, size, batch),
               f"{model.arch.name} on {size}x{size} px in batches of {batch}", "lower --resolution or --batch", dev)
    run = runner(model.to(dev), engine, precision, features)
    skipped: list[Skipped] = []

    def note(s: Skipped) -> None:
        skipped.append(s)
        if on_skip is not None:
            on_skip(s)

    kept: list[int] = []
    outputs: list[torch.Tensor] = []
    for indices, images in iter_image_batches(files, config, batch_size, workers, note, progress,
                                              desc="embedding" if features else "predicting",
                                              pin_memory=dev.type == "cuda"):
        x = images.to(dev, non_blocking=True)
        out = run(x)
        kept.extend(indices)
        outputs.append(out.float().cpu())
    return kept, (torch.cat(outputs) if outputs else None), skipped


def predict_files(model: ResNetV2, files: Sequence[str | os.PathLike], size: Size, top_k: int = 5,
                  labels: Sequence[str] | None = None, batch_size: int = DEFAULT_BATCH, workers: int | None = None,
                  precision: str = "fp32", device: str = "auto", progress: bool = False,
                  on_skip: Callable[[Skipped], None] | None = None,
                  engine: str = "torch") -> tuple[list[Prediction], list[Skipped]]:
    """Top-k classes with softmax scores for every decodable file, and the files that were skipped.

    `engine`: "torch" (prepare_for_inference), "compile" (the same, torch.compile'd) or "onnxruntime" (our ONNX
    export, fp32 on the CPU); see bigtransfer.deploy.engines.
    """
    if top_k < 1:
        raise UserError(f"top-k must be at least 1, got {top_k}")
    kept, logits, skipped = _run(model, files, size, False, batch_size, workers, precision, device, progress, on_skip,
                                 engine)
    if logits is None:
        return [], skipped
    probs = torch.softmax(logits.double(), dim=1)
    scores, classes = probs.topk(min(top_k, probs.shape[1]), dim=1)
    preds = []
    for row, i in enumerate(kept):
        top = [(int(c), labels[int(c)] if labels is not None else None, float(s))
               for c, s in zip(classes[row], scores[row], strict=True)]
        preds.append(Prediction(str(files[i]), top))
    return preds, skipped


def embed_files(model: ResNetV2, files: Sequence[str | os.PathLike], size: Size, batch_size: int = DEFAULT_BATCH,
                workers: int | None = None, precision: str = "fp32", device: str = "auto", progress: bool = False,
                on_skip: Callable[[Skipped], None] | None = None, engine: str = "torch") -> Embeddings:
    """Pooled pre-logits (N, feature_dim) of every decodable file, in input order (`engine`: as predict_files)."""
    kept, feats, skipped = _run(model, files, size, True, batch_size, workers, precision, device, progress, on_skip,
                                engine)
    if feats is None:
        return Embeddings(np.zeros((0, model.feature_dim), np.float32), [], [], skipped)
    return Embeddings(feats.numpy().astype(np.float32, copy=False), [str(files[i]) for i in kept], kept, skipped)


ImageInput = str | os.PathLike | PILImage.Image


def predict(model: ResNetV2 | str | os.PathLike, images: ImageInput | Sequence[ImageInput], top_k: int = 5,
            resolution: int | None = None, batch_size: int = DEFAULT_BATCH, precision: str = "fp32",
            device: str = "auto", engine: str = "torch") -> list[Prediction]:
    """Top-k (class index, label name, probability) of each image, best first, prepared as the model records.

    `model`: a model, or a name/checkpoint that `create_model` loads. `images`: file paths or PIL images (one or a
    list); a file that cannot be decoded raises ImageError naming it. Label names come from the checkpoint (or
    the released label file); they are None where neither names the classes. `resolution` overrides the size of
    the model's data config (see resolve_data_config). `engine`: as predict_files.
    """
    if isinstance(model, str | os.PathLike):
        model = create_model(str(model)) if not Path(model).exists() else load_model(None, model)
    if top_k < 1:
        raise UserError(f"top_k must be at least 1, got {top_k}")
    items = [images] if isinstance(images, str | os.PathLike | PILImage.Image) else list(images)
    transform = create_transform(resolve_data_config(model, resolution=resolution))
    labels, _ = label_names(model)
    dev = engine_device(engine, precision, device)
    run = runner(model.to(dev), engine, precision, False)
    preds: list[Prediction] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        x = torch.stack([transform(to_rgb(i) if isinstance(i, PILImage.Image) else open_rgb(i)) for i in chunk])
        with torch.no_grad():
            probs = torch.softmax(run(x.to(dev)).double().cpu(), dim=1)
        scores, classes = probs.topk(min(top_k, probs.shape[1]), dim=1)
        for item, cs, ss in zip(chunk, classes, scores, strict=True):
            name = str(item) if not isinstance(item, PILImage.Image) else "<image>"
            preds.append(Prediction(name, [(int(c), labels[int(c)] if labels else None, float(s))
                                           for c, s in zip(cs, ss, strict=True)]))
    return preds
