"""create_model: build any BiT model by name, with weights from a file, the zoo, or none."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .checkpoints import CheckpointError, infer_arch, load_state, read_checkpoint
from .models import WS_EPS_RELEASE, ResNetV2
from .registry import resolve
from .zoo import weights_file

Pretrained = bool | str | os.PathLike | None


def create_model(name: str, num_classes: int | None = None, pretrained: Pretrained = None,
                 ws_eps: float | None = None, progress: bool = True) -> ResNetV2:
    """Build a BiT model by name; load weights from a path, the zoo or bundled files; optionally a new head.

    `pretrained`: a checkpoint path; True to require the name's released or bundled weights;
    False for random weights; None (default) loads the name's weights when it has any.
    `num_classes`: None keeps the checkpoint's (or the name's) head; another number gives a new
    head initialised to exactly zero.
    """
    info = resolve(name)
    path: Path | None = None
    if isinstance(pretrained, str | os.PathLike):
        path = Path(pretrained)
    elif pretrained is True or (pretrained is None and info.has_weights):
        if not info.has_weights:
            raise ValueError(f"{name} has no released weights; pass pretrained=<path> or pretrained=False")
        path = weights_file(info, progress=progress)

    if path is None:
        return ResNetV2(info.arch, num_classes or info.num_classes,
                        ws_eps=WS_EPS_RELEASE if ws_eps is None else ws_eps)

    state, meta = read_checkpoint(path)
    arch = infer_arch(state, str(path))
    if arch != info.arch:
        raise CheckpointError(f"{path} holds an {arch.name}, but model {name!r} is an {info.arch.name}")
    if "head.weight" not in state:
        raise CheckpointError(f"{path}: missing the classifier head (head.weight, head.bias)")
    ckpt_classes = int(state["head.weight"].shape[0])
    eps = ws_eps if ws_eps is not None else float(meta.get("ws_eps", WS_EPS_RELEASE))
    model = ResNetV2(arch, ckpt_classes, ws_eps=eps)
    load_state(model, state, str(path))
    if "labels" in meta:
        model.labels = json.loads(meta["labels"])
    if num_classes is not None and num_classes != ckpt_classes:
        model.reset_head(num_classes, zero_init=True)
    return model
