"""The files timm and HF transformers keep beside BiT weights (config.json, preprocessor_config.json), read and written.

Reading: an HF transformers config decides the architecture (`layer_type`, `global_padding`,
`embedding_dynamic_padding`) and names the classes (`id2label`); what this package cannot build is refused, naming
the setting. timm's config.json gives the evaluation transform (`pretrained_cfg`) and class names. Writing: the
config.json that `BitForImageClassification.from_pretrained` reads, and a preprocessor_config.json that squashes
and scales as the model expects.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core.errors import CheckpointError
from .preprocess import META_KEY, check_data_config
from .resnetv2 import DEPTHS, GN_GROUPS, Arch, ResNetV2

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
# HF's resample codes are PIL's filter numbers.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
_PLACEHOLDER = re.compile(r"^LABEL_(\d+)$")
_TIMM_ARCH = re.compile(r"^resnetv2_(\d+)x(\d+)_bit")


class PeerConfigError(CheckpointError):
    """A peer's config.json that this package cannot honour; the message names the file and the setting."""


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; the error names the file."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PeerConfigError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(doc, dict):
        raise PeerConfigError(f"{path}: expected a JSON object, found {type(doc).__name__}")
    return doc


def hf_padding(config: Mapping[str, Any], source: str) -> str:
    """Our padding mode for an HF BitConfig; refuses the layouts this package does not build."""
    layer_type = config.get("layer_type", "preactivation")
    if layer_type != "preactivation":
        raise PeerConfigError(f"{source}: layer_type {layer_type!r} is not supported: only 'preactivation' "
                              "(BiT's ResNet-v2) is; 'bottleneck' is the ViT-hybrid backbone's post-activation layout")
    for key, want in (("num_groups", GN_GROUPS), ("hidden_act", "relu"), ("output_stride", 32), ("num_channels", 3)):
        if config.get(key, want) != want:
            raise PeerConfigError(f"{source}: {key} {config[key]!r} is not supported (BiT uses {want!r})")
    padding = config.get("global_padding")
    dynamic_pool = bool(config.get("embedding_dynamic_padding", False))
    if padding is None:
        if dynamic_pool:
            raise PeerConfigError(f"{source}: embedding_dynamic_padding without global_padding 'SAME' is not "
                                  "supported")
        return "fixed"
    if str(padding).upper() == "SAME":
        return "same_pool" if dynamic_pool else "same"
    raise PeerConfigError(f"{source}: global_padding {padding!r} is not supported; use null (the authors' fixed "
                          "padding) or 'SAME'")


def _labels(names: list[Any], source: str) -> list[str] | None:
    if not all(isinstance(v, str) for v in names):
        raise PeerConfigError(f"{source}: class names must be strings")
    # HF fills id2label with LABEL_0, LABEL_1, ... when a config names no classes: those are no names.
    if all(_PLACEHOLDER.match(v) and int(_PLACEHOLDER.match(v)[1]) == i for i, v in enumerate(names)):
        return None
    return names


def hf_labels(config: Mapping[str, Any], source: str) -> list[str] | None:
    """The class names of an HF config's id2label, in index order (None for HF's LABEL_i placeholders)."""
    id2label = config.get("id2label")
    if not id2label:
        return None
    try:
        table = {int(k): v for k, v in id2label.items()}
    except (AttributeError, ValueError):
        raise PeerConfigError(f"{source}: id2label must map class indices to names") from None
    if sorted(table) != list(range(len(table))):
        raise PeerConfigError(f"{source}: id2label does not number its classes 0..{len(table) - 1}")
    return _labels([table[i] for i in range(len(table))], source)


def hf_meta(config: Mapping[str, Any], source: str) -> dict[str, str]:
    """Checkpoint metadata (padding, labels) from an HF transformers config.json."""
    meta = {"padding": hf_padding(config, source)}
    labels = hf_labels(config, source)
    if labels is not None:
        meta["labels"] = json.dumps(labels)
    return meta


def hf_preprocessor_meta(config: Mapping[str, Any], source: str) -> dict[str, str]:
    """Checkpoint metadata (data_config) from an HF preprocessor_config.json; empty when it says too little."""
    size = config.get("crop_size") if config.get("do_center_crop") else config.get("size")
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge")
    if not isinstance(size, int):
        return {}
    crop, pct = "squash", 1.0
    short = config.get("size", {}).get("shortest_edge") if isinstance(config.get("size"), dict) else None
    if config.get("do_center_crop"):
        crop = "center"
        pct = min(1.0, size / short) if isinstance(short, int) and short > 0 else 1.0
    dc = {"input_size": [3, size, size], "mean": config.get("image_mean", [0.5] * 3),
          "std": config.get("image_std", [0.5] * 3), "interpolation": _RESAMPLE.get(config.get("resample", 2),
                                                                                    "bilinear"),
          "crop": crop, "crop_pct": pct}
    return {META_KEY: json.dumps(check_data_config(dc, source))}


def timm_meta(config: Mapping[str, Any], source: str) -> dict[str, str]:
    """Checkpoint metadata (data_config, labels) from a timm hub config.json."""
    meta: dict[str, str] = {}
    cfg = config.get("pretrained_cfg") or {}
    if "input_size" in cfg:
        dc = {"input_size": cfg["input_size"], "mean": cfg.get("mean", [0.5] * 3), "std": cfg.get("std", [0.5] * 3),
              "interpolation": cfg.get("interpolation", "bilinear"), "crop": "center",
              "crop_pct": cfg.get("crop_pct", 1.0)}
        meta[META_KEY] = json.dumps(check_data_config(dc, source))
    names = config.get("label_names")
    if isinstance(names, list) and names:
        labels = _labels(names, source)
        if labels is not None:
            meta["labels"] = json.dumps(labels)
    return meta


def sidecar_meta(weights: Path, flavour: str) -> dict[str, str]:
    """Metadata from the peer's config files beside a weights file (none for our own formats)."""
    folder = weights.parent
    meta: dict[str, str] = {}
    config_path = folder / CONFIG_FILE
    if flavour == "hf":
        if config_path.is_file():
            meta.update(hf_meta(read_json(config_path), str(config_path)))
        if (folder / PREPROCESSOR_FILE).is_file():
            meta.update(hf_preprocessor_meta(read_json(folder / PREPROCESSOR_FILE), str(folder / PREPROCESSOR_FILE)))
    elif flavour == "timm" and config_path.is_file():
        config = read_json(config_path)
        if "architecture" in config:  # a timm hub config, not some other program's config.json
            meta.update(timm_meta(config, str(config_path)))
    return meta


def weights_in(folder: Path) -> Path:
    """The weights file of an HF-style model folder (save_pretrained's layout); the error lists what is there."""
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    shown = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
    raise PeerConfigError(f"{folder}: a folder, but without {' or '.join(HF_WEIGHT_FILES)} (it holds {shown})")


def arch_from_config(config: Mapping[str, Any], source: str) -> tuple[Arch, int]:
    """(architecture, classes) from an HF transformers or timm config.json, before any weights are read."""
    if "depths" in config or config.get("model_type") == "bit":
        hf_padding(config, source)
        depths = tuple(config.get("depths", (3, 4, 6, 3)))
        width = config.get("hidden_sizes", [2048])[-1] / 2048
        depth = next((d for d, units in DEPTHS.items() if units == depths), None)
        if depth is None:
            raise PeerConfigError(f"{source}: depths {list(depths)} match no BiT depth ({sorted(DEPTHS)})")
        return Arch(depth, width), len(config.get("id2label") or {}) or int(config.get("num_labels", 2))
    m = _TIMM_ARCH.match(str(config.get("architecture", "")))
    if m:
        return Arch(int(m[1]), float(m[2])), int(config.get("num_classes", 1000))
    raise PeerConfigError(f"{source}: neither an HF transformers BiT config nor a timm resnetv2_*_bit config")


def hf_config(model: ResNetV2) -> dict[str, Any]:
    """The config.json of `model` as HF transformers' BitForImageClassification reads it."""
    w = model.arch.width
    labels = model.labels or [f"LABEL_{i}" for i in range(model.num_classes)]
    return {
        "architectures": ["BitForImageClassification"], "model_type": "bit", "num_channels": 3,
        "embedding_size": model.arch.root_channels, "hidden_sizes": [int(256 * w * 2**i) for i in range(4)],
        "depths": list(model.arch.units), "layer_type": "preactivation", "hidden_act": "relu",
        "global_padding": None if model.padding == "fixed" else "SAME",
        "embedding_dynamic_padding": model.padding == "same_pool", "num_groups": GN_GROUPS, "drop_path_rate": 0.0,
        "output_stride": 32, "width_factor": 1,
        "id2label": {str(i): n for i, n in enumerate(labels)}, "label2id": {n: i for i, n in enumerate(labels)},
    }


def hf_preprocessor(config: Mapping[str, Any]) -> dict[str, Any]:
    """An HF BitImageProcessor config that prepares images as the data config says."""
    size = int(config["input_size"][1])
    center = config["crop"] == "center"
    resample = {v: k for k, v in _RESAMPLE.items()}[config["interpolation"]]
    out: dict[str, Any] = {"image_processor_type": "BitImageProcessor", "do_convert_rgb": True, "do_resize": True,
                           "resample": resample, "do_rescale": True, "rescale_factor": 1 / 255,
                           "do_normalize": True, "image_mean": list(config["mean"]), "image_std": list(config["std"]),
                           "do_center_crop": center}
    if center:
        out["size"] = {"shortest_edge": int(size / config["crop_pct"] + 0.5)}
        out["crop_size"] = {"height": size, "width": size}
    else:
        out["size"] = {"height": size, "width": size}
    return out
