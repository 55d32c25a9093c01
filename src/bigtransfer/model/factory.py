"""create_model: build any BiT model by name, with weights from a file, the zoo, or none."""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoints import (
    CheckpointError,
    infer_arch,
    load_state,
    meta_labels,
    meta_padding,
    meta_ws_eps,
    read_checkpoint,
)
from .downloads import cached_file_hint, weights_file
from .hub import fetch_weights
from .preprocess import meta_data_config
from .registry import ModelInfo, resolve
from .resnetv2 import WS_EPS_RELEASE, ResNetV2, check_num_classes, check_ws_eps

Pretrained = bool | str | os.PathLike | None


def _check_arguments(name: object, num_classes: object, pretrained: object, ws_eps: object) -> None:
    """Refuse wrong types before anything is built or downloaded (pretrained=1 once meant random weights)."""
    if not isinstance(name, str):
        raise TypeError(f"create_model needs a model name (a str such as 'BiT-M-R50x1' or 'R50x1'), got {name!r}")
    if num_classes is not None:
        check_num_classes(num_classes)
    if pretrained is not None and not isinstance(pretrained, bool | str | os.PathLike):
        raise TypeError(f"pretrained must be True, False, None or a checkpoint path, got {pretrained!r}")
    if ws_eps is not None:
        check_ws_eps(ws_eps)


def create_model(name: str, num_classes: int | None = None, pretrained: Pretrained = None,
                 ws_eps: float | None = None, progress: bool = True) -> ResNetV2:
    """Build a BiT model by name; load weights from a path, the zoo or bundled files; optionally a new head.

    `pretrained`: a checkpoint path; True to require the name's released or bundled weights;
    False for random weights; None (default) loads the name's weights when it has any.
    `num_classes`: None keeps the checkpoint's (or the name's) head; another number gives a new
    head initialised to exactly zero; 0 gives no head (forward returns the pooled pre-logits).
    """
    _check_arguments(name, num_classes, pretrained, ws_eps)
    info = resolve(name)
    path: Path | None = None
    downloaded = False
    if isinstance(pretrained, str | os.PathLike):
        path = Path(pretrained)
    elif pretrained is True or (pretrained is None and info.has_weights):
        if not info.has_weights:
            raise CheckpointError(f"{name} has no released weights; pass pretrained=<path> or pretrained=False")
        if info.hub is not None:

            path = fetch_weights(info.hub)
        else:
            path = weights_file(info, progress=progress)
            downloaded = info.path is None

    if path is None:
        model = ResNetV2(info.arch, info.num_classes if num_classes is None else num_classes,
                         ws_eps=WS_EPS_RELEASE if ws_eps is None else ws_eps)
        model.data_config = info.data_config
        return model
    try:
        return _from_checkpoint(info, path, num_classes, ws_eps)
    except CheckpointError as e:
        if downloaded:  # a damaged download must not fail the same way forever
            raise CheckpointError(f"{e}\n  {cached_file_hint(path)}") from None
        raise


def _from_checkpoint(info: ModelInfo, path: Path, num_classes: int | None, ws_eps: float | None) -> ResNetV2:
    state, meta = read_checkpoint(path)
    arch = infer_arch(state, str(path))
    if arch != info.arch:
        raise CheckpointError(f"{path} holds an {arch.name}, but model {info.name!r} is an {info.arch.name}")
    # A checkpoint without a head holds features only (saved from a num_classes=0 model).
    ckpt_classes = int(state["head.weight"].shape[0]) if "head.weight" in state else 0
    eps = ws_eps if ws_eps is not None else meta_ws_eps(meta, path)
    model = ResNetV2(arch, ckpt_classes, ws_eps=eps, padding=meta_padding(meta, path))
    load_state(model, state, str(path))
    model.labels = meta_labels(meta, path, model.num_classes)
    # What the file records wins; else what the name says (a released fine-tuned model's task resolution).
    model.data_config = meta_data_config(meta, path) or info.data_config
    if num_classes is not None and num_classes != ckpt_classes:
        model.reset_head(num_classes, zero_init=True)
    return model
