"""How a model wants its input: resolution, pixel scaling, resampling and crop, carried with the model.

A data config is a plain dict, as timm's ``resolve_data_config`` returns::

    {"input_size": [3, H, W], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
     "interpolation": "bilinear", "crop": "squash", "crop_pct": 1.0}

``crop`` is "squash" (BiT: resize the whole image to H x W, ignoring its aspect ratio) or "center" (timm: resize
the shorter side to H / crop_pct, cut the central H x W). Every checkpoint we write records one (metadata key
``data_config``): fine-tuning records its HyperRule evaluation crop (or --resolution), pre-training its
resolution. ``predict``, ``embed``, ``evaluate linear/knn`` and ``export`` use it unless told otherwise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..data.transforms import BIT_MEAN, BIT_STD, CROP_MODES, INTERPOLATIONS, EvalTransform

# What predict and embed use for a model that records nothing (upstream BiT-S/BiT-M weights, random weights):
# the upstream models' pre-training resolution. The HyperRule's evaluation crop depends on the task's image size,
# which a model alone does not know; `evaluate linear/knn`, which knows the data, applies the rule instead.
DEFAULT_RESOLUTION = 224
META_KEY = "data_config"


def data_config(resolution: int, *, mean: tuple[float, ...] = BIT_MEAN, std: tuple[float, ...] = BIT_STD,
                interpolation: str = "bilinear", crop: str = "squash", crop_pct: float = 1.0) -> dict[str, Any]:
    """A data config for square inputs of `resolution` px; the defaults are BiT's evaluation transform."""
    return check_data_config({"input_size": [3, resolution, resolution], "mean": list(mean), "std": list(std),
                              "interpolation": interpolation, "crop": crop, "crop_pct": crop_pct})


def check_data_config(config: Mapping[str, Any], source: str = "data config") -> dict[str, Any]:
    """A validated copy of `config` (lists, not tuples, so it round-trips through JSON); the error names `source`."""
    try:
        size = [int(v) for v in config["input_size"]]
        out = {"input_size": size, "mean": [float(v) for v in config.get("mean", BIT_MEAN)],
               "std": [float(v) for v in config.get("std", BIT_STD)],
               "interpolation": str(config.get("interpolation", "bilinear")),
               "crop": str(config.get("crop", "squash")), "crop_pct": float(config.get("crop_pct", 1.0))}
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{source}: not a data config ({type(e).__name__}: {e}); expected input_size, mean, std, "
                        "interpolation, crop") from None
    if len(size) != 3 or size[0] != 3 or size[1] < 1 or size[2] < 1 or size[1] != size[2]:
        raise UserError(f"{source}: input_size must be [3, R, R] with R >= 1, got {size}")
    if out["interpolation"] not in INTERPOLATIONS or out["crop"] not in CROP_MODES:
        raise UserError(f"{source}: interpolation must be one of {', '.join(INTERPOLATIONS)} and crop one of "
                        f"{', '.join(CROP_MODES)}; got {out['interpolation']!r}, {out['crop']!r}")
    if len(out["mean"]) != 3 or len(out["std"]) != 3 or min(out["std"]) <= 0 or not 0 < out["crop_pct"] <= 1:
        raise UserError(f"{source}: mean and std need 3 values (std > 0) and crop_pct must be in (0, 1]")
    return out


def meta_data_config(meta: Mapping[str, str], source: str | os.PathLike) -> dict[str, Any] | None:
    """The data config a checkpoint's metadata records, or None when it records none."""
    if META_KEY not in meta:
        return None
    try:
        raw = json.loads(meta[META_KEY])
    except ValueError:
        raw = None
    if not isinstance(raw, dict):
        raise UserError(f"{source}: its metadata '{META_KEY}' is not a JSON object")
    return check_data_config(raw, f"{source}: metadata '{META_KEY}'")


def resolve_data_config(model_or_checkpoint: Any = None, resolution: int | None = None) -> dict[str, Any]:
    """The data config for a model, a checkpoint file or a model name, as timm's resolve_data_config.

    A model (ResNetV2 or its inference wrapper) gives what it carries; a checkpoint path what its metadata records;
    a name what the registry knows of it (released fine-tuned BiT: the HyperRule's crop of its task; timm names:
    timm's config). Anything that records nothing gets DEFAULT_RESOLUTION with BiT's scaling. `resolution`
    overrides the size and keeps the rest.
    """
    config = _recorded(model_or_checkpoint)
    config = dict(config) if config is not None else data_config(DEFAULT_RESOLUTION)
    if resolution is not None:
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise UserError(f"resolution must be a positive integer, got {resolution!r}")
        config["input_size"] = [3, resolution, resolution]
    return config


def _recorded(obj: Any) -> dict[str, Any] | None:
    if obj is None:
        return None
    if hasattr(obj, "data_config"):
        return obj.data_config
    if isinstance(obj, str | os.PathLike) and Path(obj).is_file():
        from .checkpoints import read_checkpoint  # local import: checkpoints imports this module

        return meta_data_config(read_checkpoint(obj)[1], obj)
    if isinstance(obj, str):
        from .registry import resolve

        return resolve(obj).data_config
    raise TypeError(f"resolve_data_config takes a model, a checkpoint path or a model name, got {obj!r}")


def create_transform(config: Mapping[str, Any]) -> EvalTransform:
    """The evaluation transform for a data config: PIL RGB image -> float (3, R, R) tensor."""
    c = check_data_config(config)
    return EvalTransform(c["input_size"][1], interpolation=c["interpolation"], mean=tuple(c["mean"]),
                         std=tuple(c["std"]), crop_mode=c["crop"], crop_pct=c["crop_pct"])


def resolution_of(config: Mapping[str, Any]) -> int:
    """The square input size a data config asks for."""
    return int(config["input_size"][1])
