"""Read and write BiT weights: the authors' .npz, our .safetensors, and timm / HF transformers state dicts."""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..core.atomic import atomic_group, atomic_path
from ..core.errors import CheckpointError, UserError
from ..core.validate import check_out_file
from .peers import CONFIG_FILE, PREPROCESSOR_FILE, hf_config, hf_preprocessor, sidecar_meta, weights_in
from .preprocess import META_KEY
from .resnetv2 import DEPTHS, WS_EPS_PEERS, WS_EPS_RELEASE, Arch, ResNetV2, check_padding, check_ws_eps

FORMAT_TAG = "bigtransfer"
State = dict[str, torch.Tensor]


# ---------------------------------------------------------------- authors' .npz layout

_NPZ_UNIT = re.compile(r"^block(\d)/unit(\d+)/([abc])/(proj/)?(standardized_conv2d(?:_\d+)?|group_norm)/(\w+)$")
_CONV_LETTER = {"a": "conv1", "b": "conv2", "c": "conv3"}
_GN_LETTER = {"a": "gn1", "b": "gn2", "c": "gn3"}
_GN_PARAM = {"gamma": "weight", "beta": "bias"}


def _hwio_to_oihw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(a, (3, 2, 0, 1))))


def _oihw_to_hwio(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy().transpose(2, 3, 1, 0))


def _npz_key_to_ours(key: str) -> tuple[str, bool] | None:
    """Map one authors' key to (our key, is_conv_kernel); None when it is not a model weight."""
    k = key[len("resnet/"):] if key.startswith("resnet/") else key
    k = re.sub(r"standardized_conv2d_\d+", "standardized_conv2d", k)
    if k == "root_block/standardized_conv2d/kernel":
        return "root.conv.weight", True
    if k.startswith("group_norm/") and k.split("/")[1] in _GN_PARAM:
        return f"norm.{_GN_PARAM[k.split('/')[1]]}", False
    if k == "head/conv2d/kernel":
        return "head.weight", True
    if k == "head/conv2d/bias":
        return "head.bias", False
    m = _NPZ_UNIT.match(k)
    if not m:
        return None
    block, unit, letter, proj, layer, param = m.groups()
    prefix = f"stages.{int(block) - 1}.{int(unit) - 1}"
    if proj:
        return (f"{prefix}.proj.weight", True) if param == "kernel" else None
    if layer.startswith("standardized_conv2d") and param == "kernel":
        return f"{prefix}.{_CONV_LETTER[letter]}.weight", True
    if layer == "group_norm" and param in _GN_PARAM:
        return f"{prefix}.{_GN_LETTER[letter]}.{_GN_PARAM[param]}", False
    return None


def npz_to_state(arrays: Mapping[str, np.ndarray], source: str = "<arrays>") -> State:
    """Convert the authors' arrays (HWIO kernels) to our state dict (OIHW)."""
    state: State = {}
    unknown = []
    for key in arrays:
        mapped = _npz_key_to_ours(key)
        if mapped is None:
            unknown.append(key)
            continue
        ours, is_kernel = mapped
        a = np.asarray(arrays[key])
        if is_kernel:
            if a.ndim != 4:
                raise CheckpointError(f"{source}: {key} should be a 4-D HWIO kernel, has shape {a.shape}")
            state[ours] = _hwio_to_oihw(a)
        else:
            state[ours] = torch.from_numpy(np.array(a).reshape(-1))
    if unknown:
        raise CheckpointError(f"{source}: keys that are not part of a BiT ResNet-v2: {_short(unknown)}")
    return state


def state_to_npz(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Convert our state dict to the authors' key names and HWIO layout."""
    out: dict[str, np.ndarray] = {}
    inv_conv = {v: k for k, v in _CONV_LETTER.items()}
    inv_gn = {v: k for k, v in _GN_LETTER.items()}
    inv_param = {v: k for k, v in _GN_PARAM.items()}
    for key, t in state.items():
        parts = key.split(".")
        if key == "root.conv.weight":
            name, v = "root_block/standardized_conv2d/kernel", _oihw_to_hwio(t)
        elif parts[0] == "norm":
            name, v = f"group_norm/{inv_param[parts[1]]}", t.detach().cpu().numpy()
        elif key == "head.weight":
            name, v = "head/conv2d/kernel", _oihw_to_hwio(t)
        elif key == "head.bias":
            name, v = "head/conv2d/bias", t.detach().cpu().numpy()
        elif parts[0] == "stages":
            unit = f"block{int(parts[1]) + 1}/unit{int(parts[2]) + 1:02d}"
            layer = parts[3]
            if layer == "proj":
                name, v = f"{unit}/a/proj/standardized_conv2d/kernel", _oihw_to_hwio(t)
            elif layer in inv_conv:
                name, v = f"{unit}/{inv_conv[layer]}/standardized_conv2d/kernel", _oihw_to_hwio(t)
            else:
                name, v = f"{unit}/{inv_gn[layer]}/group_norm/{inv_param[parts[4]]}", t.detach().cpu().numpy()
        else:
            raise CheckpointError(f"cannot export key {key!r} to the authors' layout")
        out[f"resnet/{name}"] = v
    return out


# ---------------------------------------------------------------- timm and HF transformers

# One table per peer, read both ways: (our key, their key), with {s} stage, {u} unit, {n} layer number and {p}
# weight/bias. HF's head is a Linear (2-D weight); timm's, like ours, a 1x1 conv.
_KEYS = {
    "hf": [("root.conv.weight", "bit.embedder.convolution.weight"),
           ("stages.{s}.{u}.proj.weight", "bit.encoder.stages.{s}.layers.{u}.downsample.conv.weight"),
           ("stages.{s}.{u}.gn{n}.{p}", "bit.encoder.stages.{s}.layers.{u}.norm{n}.{p}"),
           ("stages.{s}.{u}.conv{n}.weight", "bit.encoder.stages.{s}.layers.{u}.conv{n}.weight"),
           ("norm.{p}", "bit.norm.{p}"), ("head.{p}", "classifier.1.{p}")],
    "timm": [("root.conv.weight", "stem.conv.weight"),
             ("stages.{s}.{u}.proj.weight", "stages.{s}.blocks.{u}.downsample.conv.weight"),
             ("stages.{s}.{u}.gn{n}.{p}", "stages.{s}.blocks.{u}.norm{n}.{p}"),
             ("stages.{s}.{u}.conv{n}.weight", "stages.{s}.blocks.{u}.conv{n}.weight"),
             ("norm.{p}", "norm.{p}"), ("head.{p}", "head.fc.{p}")],
}
_FIELDS = {"s": r"\d+", "u": r"\d+", "n": r"\d", "p": "weight|bias"}
_FLAVOUR_NAMES = {"hf": "HF transformers", "timm": "timm"}


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)  # literal, field, literal, field, ...
    return re.compile("^" + "".join(re.escape(t) if i % 2 == 0 else f"(?P<{t}>{_FIELDS[t]})"
                                     for i, t in enumerate(parts)) + "$")


def _rename(state: Mapping[str, torch.Tensor], flavour: str, to_ours: bool, source: str) -> State:
    """`state` with every key mapped through _KEYS[flavour], towards ours or towards theirs; unknown keys refused."""
    rules = [(_pattern(theirs if to_ours else ours), ours if to_ours else theirs) for ours, theirs in _KEYS[flavour]]
    out: State = {}
    unknown = []
    for key, t in state.items():
        for pat, target in rules:
            m = pat.match(key)
            if m:
                out[target.format(**m.groupdict())] = t
                break
        else:
            if not (to_ours and key.endswith("num_batches_tracked")):
                unknown.append(key)
    if unknown:
        what = f"{_FLAVOUR_NAMES[flavour]} keys that are not part of a BiT ResNet-v2" if to_ours else \
            f"keys that have no {_FLAVOUR_NAMES[flavour]} name"
        raise CheckpointError(f"{source}: {what}: {_short(unknown)}")
    if to_ours and "head.weight" in out and out["head.weight"].ndim == 2:  # HF's Linear head
        out["head.weight"] = out["head.weight"][:, :, None, None]
    if not to_ours and flavour == "hf" and "classifier.1.weight" in out:
        out["classifier.1.weight"] = out["classifier.1.weight"][:, :, 0, 0]
    return out


def state_to_peer(state: Mapping[str, torch.Tensor], flavour: str) -> State:
    """Our state dict with 'hf' (BitForImageClassification) or 'timm' (resnetv2_*_bit) keys."""
    return _rename(state, flavour, to_ours=False, source="the model")


def hf_to_state(state: Mapping[str, torch.Tensor], source: str = "<state dict>") -> State:
    """Convert HF transformers' BitForImageClassification/BitModel keys to ours."""
    return _rename(state, "hf", to_ours=True, source=source)


def timm_to_state(state: Mapping[str, torch.Tensor], source: str = "<state dict>") -> State:
    """Convert timm's resnetv2_*_bit keys to ours."""
    return _rename(state, "timm", to_ours=True, source=source)


def detect_flavour(keys: list[str]) -> str:
    """Tell which implementation a state dict comes from: 'ours', 'hf', 'timm' or 'npz'."""
    if any(k.startswith("bit.") for k in keys):
        return "hf"
    if any(k.startswith("stem.") or ".blocks." in k for k in keys):
        return "timm"
    if any("/" in k for k in keys):
        return "npz"
    return "ours"


# ---------------------------------------------------------------- files

def _short(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" ... ({len(keys) - n} more)" if len(keys) > n else "")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata stored in a .safetensors header (empty for files without any)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from None


def meta_ws_eps(meta: Mapping[str, str], source: str | os.PathLike) -> float:
    """The weight-standardization eps a checkpoint's metadata records (the release's when it records none)."""
    raw = meta.get("ws_eps", repr(WS_EPS_RELEASE))
    try:
        return check_ws_eps(float(raw))
    except (ValueError, TypeError):
        raise CheckpointError(f"{source}: its metadata records ws_eps {raw!r}, not a finite positive number") from None


def meta_labels(meta: Mapping[str, str], source: str | os.PathLike, num_classes: int) -> list[str] | None:
    """The class names a checkpoint's metadata records (None when it records none), one per class."""
    if "labels" not in meta:
        return None
    try:
        labels = json.loads(meta["labels"])
    except ValueError:
        labels = None
    if not isinstance(labels, list) or not all(isinstance(v, str) for v in labels):
        raise CheckpointError(f"{source}: its metadata 'labels' is not a JSON list of class names")
    if len(labels) != num_classes:
        raise CheckpointError(f"{source}: its metadata names {len(labels)} classes, but the head has {num_classes}; "
                              "rewrite it with 'bigtransfer convert --labels FILE'")
    return labels


def meta_padding(meta: Mapping[str, str], source: str | os.PathLike) -> str:
    """The padding mode a checkpoint's metadata records (the authors' fixed padding when it records none)."""
    try:
        return check_padding(meta.get("padding", "fixed"))
    except UserError as e:
        raise CheckpointError(f"{source}: {e}") from None


def read_checkpoint(path: str | os.PathLike) -> tuple[State, dict[str, str]]:
    """Read weights from .npz, .safetensors, or a torch state dict, as our state dict plus metadata.

    An HF transformers or timm file brings the config.json (and preprocessor_config.json) beside it into the
    metadata: padding, labels, data_config; a folder written by save_pretrained is read through its weights file.
    """
    p = Path(path)
    if p.is_dir():
        p = weights_in(p)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such checkpoint file")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: the file is empty")
    suffix = p.suffix.lower()
    meta: dict[str, str] = {}
    if suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as e:
            raise CheckpointError(f"{p}: not a readable .npz checkpoint (truncated or not a zip archive: {e})") from None
        state = npz_to_state(arrays, str(p))
        meta = {"source": "npz", "ws_eps": repr(WS_EPS_RELEASE)}
        return state, meta
    if suffix == ".safetensors":
        meta = read_metadata(p)
        try:
            with safe_open(str(p), framework="pt") as f:
                raw = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{p}: not a readable .safetensors file ({e})") from None
    elif suffix in (".pt", ".pth", ".bin"):
        try:
            raw = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad pickle or zip
            raise CheckpointError(f"{p}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
        if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
            raw = raw["state_dict"]
        if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
            raise CheckpointError(f"{p}: does not hold a state dict of tensors")
    else:
        raise CheckpointError(f"{p}: unknown checkpoint type {suffix!r}; use .npz, .safetensors, .pt, .pth or .bin")
    flavour = detect_flavour(list(raw))
    meta.update(sidecar_meta(p, flavour))
    if flavour == "hf":
        state = hf_to_state(raw, str(p))
        meta.setdefault("ws_eps", repr(WS_EPS_PEERS))
    elif flavour == "timm":
        state = timm_to_state(raw, str(p))
        meta.setdefault("ws_eps", repr(WS_EPS_PEERS))
    elif flavour == "npz":
        state = npz_to_state({k: v.numpy() for k, v in raw.items()}, str(p))
        meta.setdefault("ws_eps", repr(WS_EPS_RELEASE))
    else:
        state = dict(raw)
    meta.setdefault("source", flavour)
    return state, meta


def infer_arch(state: Mapping[str, torch.Tensor], source: str = "<state dict>") -> Arch:
    """The architecture a state dict was made for, from its shapes and unit counts."""
    if "root.conv.weight" not in state:
        raise CheckpointError(f"{source}: missing the root convolution (root.conv.weight)")
    width = state["root.conv.weight"].shape[0] / 64
    units = [0, 0, 0, 0]
    for key in state:
        m = re.match(r"^stages\.(\d)\.(\d+)\.conv1\.weight$", key)
        if m:
            units[int(m.group(1))] = max(units[int(m.group(1))], int(m.group(2)) + 1)
    for depth, layout in DEPTHS.items():
        if tuple(units) == layout:
            return Arch(depth, width)
    raise CheckpointError(f"{source}: units per block {units} match no known depth ({sorted(DEPTHS)})")


def check_finite(state: Mapping[str, torch.Tensor], source: str = "<state dict>", when: str = "") -> None:
    """Refuse weights holding NaN or infinity: they would give NaN scores without any other sign."""
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        counts = [f"{k} ({int((~torch.isfinite(state[k])).sum())} of {state[k].numel()} values)" for k in bad]
        raise CheckpointError(f"{source}: weights that are NaN or infinite{when} in {len(bad)} tensor(s): "
                              f"{_short(counts)}")


def load_state(model: ResNetV2, state: Mapping[str, torch.Tensor], source: str = "<state dict>") -> None:
    """Copy a state dict into a model, strictly: any missing, extra or mis-shaped key is an error."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{source} does not fit {model.arch.name} with {model.num_classes} classes:"]
        try:
            arch = infer_arch(state, source)
            if arch != model.arch:
                parts.append(f"the file holds an {arch.name}")
        except CheckpointError:
            pass
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        if shapes:
            parts.append(f"mis-shaped keys ({len(shapes)}): {_short(shapes)}")
        raise CheckpointError("\n  ".join(parts))
    check_finite(state, source)
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(state[k])


def model_metadata(model: ResNetV2, **extra: object) -> dict[str, str]:
    """The metadata we store next to a model's weights."""
    meta = {
        "format": FORMAT_TAG,
        "arch": model.arch.name,
        "num_classes": str(model.num_classes),
        "ws_eps": repr(model.ws_eps),
    }
    if model.labels is not None:
        meta["labels"] = json.dumps(list(model.labels))
    if model.padding != "fixed":
        meta["padding"] = model.padding
    if model.data_config is not None:
        meta[META_KEY] = json.dumps(model.data_config)
    for k, v in extra.items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return meta


def write_safetensors(state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None) -> None:
    """Atomically write a state dict (optionally cast to `dtype`) with string metadata."""
    tensors = {k: (v.detach().to("cpu", dtype) if dtype is not None and v.is_floating_point()
                   else v.detach().cpu()).contiguous() for k, v in state.items()}
    if dtype is not None:  # float16 overflows to infinity above 65504
        check_finite(tensors, str(path), f" once stored as {str(dtype).removeprefix('torch.')}")
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))


def write_npz(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Atomically write a state dict in the authors' .npz layout."""
    arrays = state_to_npz(state)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def write_peer(model: ResNetV2, path: str | os.PathLike, flavour: str) -> Path:
    """Write `model` for a peer: 'hf' a save_pretrained folder (config.json, model.safetensors and, when the model
    carries a data config, preprocessor_config.json); 'timm' one state-dict file (.safetensors, else torch.save)."""
    p = Path(path)
    state = state_to_peer(model.state_dict(), flavour)
    if flavour == "timm":
        check_out_file(p, "the checkpoint")
        if p.suffix.lower() == ".safetensors":
            write_safetensors(state, p, {"format": "pt"})
        else:
            with atomic_path(p) as tmp:
                torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp)
        return p
    if p.exists() and not p.is_dir():
        raise CheckpointError(f"{p}: the HF transformers format is a folder, and this is a file")
    if p.is_dir() and any(p.iterdir()) and not (p / CONFIG_FILE).is_file():
        raise CheckpointError(f"{p}: a folder holding other files (no {CONFIG_FILE} of a model); write the HF "
                              "transformers files into a new or empty folder")
    texts = {CONFIG_FILE: hf_config(model)}
    if model.data_config is not None:
        texts[PREPROCESSOR_FILE] = hf_preprocessor(model.data_config)
    # All files or none: weights beside an older config.json would load as another model.
    with atomic_group(p / "model.safetensors", *(p / name for name in texts)) as (tmp_weights, *tmp_texts):
        write_safetensors(state, tmp_weights, {"format": "pt"})
        for tmp, doc in zip(tmp_texts, texts.values(), strict=True):
            tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return p


def save_checkpoint(model: ResNetV2, path: str | os.PathLike, dtype: torch.dtype | None = None,
                    **metadata: object) -> Path:
    """Save a model as .safetensors with metadata, or as the authors' .npz when the path ends in .npz."""
    p = Path(path)
    check_out_file(p, "the checkpoint")
    if p.suffix.lower() == ".npz":
        write_npz(model.state_dict(), p)
    else:
        write_safetensors(model.state_dict(), p, model_metadata(model, **metadata), dtype=dtype)
    return p


def weights_digest(model: ResNetV2) -> str:
    """SHA-256 of the model's weights (names, dtypes, shapes and bytes) plus its architecture, WS eps and padding."""
    # The same weights with SAME padding give other features; the authors' padding keeps the keys it always had.
    padding = "" if model.padding == "fixed" else f"|{model.padding}"
    h = hashlib.sha256(f"{model.arch.name}|{model.ws_eps!r}{padding}".encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # Hash the raw bytes through a uint8 view: no dtype conversion, and bf16 works too.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
