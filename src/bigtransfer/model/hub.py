"""Names from the Hugging Face hub: timm's BiT models and HF transformers repositories (`org/name`).

Files are fetched by `huggingface_hub`, an optional dependency imported only here and only when a hub name is
used, so its cache (HF_HUB_CACHE / HF_HOME), endpoint (HF_ENDPOINT), token and HF_HUB_OFFLINE apply as they do to
timm and transformers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from .downloads import DownloadError
from .peers import CONFIG_FILE, HF_WEIGHT_FILES, PREPROCESSOR_FILE, arch_from_config, read_json
from .preprocess import data_config
from .registry import DISTILLED

TIMM_ORG = "timm"
# timm's BiT weights (spec section 7): tag -> (classes, resolution, interpolation, crop_pct).
TIMM_TAGS: dict[str, tuple[int, int, str, float]] = {
    "goog_in21k": (21843, 224, "bilinear", 0.875),
    "goog_in21k_ft_in1k": (1000, 448, "bilinear", 1.0),
}
# timm's copies of the distillation release; their settings are those of the release's names (registry.DISTILLED).
TIMM_DISTILLED = {
    "resnetv2_50x1_bit.goog_distilled_in1k": "distill/R50x1_224",
    "resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k": "distill/R152x2_T_224",
    "resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k_384": "distill/R152x2_T_384",
}
TIMM_SPECIAL: dict[str, tuple[int, int, str, float]] = {
    timm: (1000, DISTILLED[name][1], "bicubic", DISTILLED[name][2]) for timm, name in TIMM_DISTILLED.items()}
TIMM_ARCHS = ("50x1", "50x3", "101x1", "101x3", "152x2", "152x4")
# HF transformers repositories known without asking the hub: name -> (architecture, classes).
HF_KNOWN = {"google/bit-50": ("R50x1", 1000)}
_TIMM_NAME = re.compile(r"^(?:timm/)?resnetv2_(\d+)x(\d+)_bit(?:\.(\w+))?$")
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
INSTALL_HINT = "pip install huggingface_hub  (or: pip install 'bigtransfer[hub]')"


def timm_models() -> dict[str, dict[str, Any]]:
    """timm's BiT names -> {"arch", "num_classes", "data_config"}."""
    out = {}
    for arch in TIMM_ARCHS:
        for tag, spec in TIMM_TAGS.items():
            out[f"resnetv2_{arch}_bit.{tag}"] = spec
    out.update(TIMM_SPECIAL)
    table = {}
    for name, (classes, size, interp, pct) in out.items():
        if name.startswith("resnetv2_152x4_bit.") and size == 448:
            size = 480  # timm evaluates R152x4's in1k fine-tune at 480 px
        depth, width = _TIMM_NAME.match(name).group(1, 2)
        table[name] = {"arch": f"R{depth}x{width}", "num_classes": classes,
                       "data_config": data_config(size, interpolation=interp, crop="center", crop_pct=pct)}
    return table


def is_hub_name(name: str) -> bool:
    """True for a timm BiT name (with or without 'timm/') or an HF repository id 'org/name'."""
    return bool(_TIMM_NAME.match(name) or _REPO.match(name))


def hub_repo(name: str) -> str:
    """The hub repository holding a hub name's files; an untagged timm name is refused with its tags."""
    m = _TIMM_NAME.match(name)
    if m:
        if m.group(3) is None:
            tags = sorted(n for n in timm_models() if n.startswith(name.removeprefix("timm/") + "."))
            raise UserError(f"{name!r}: say which weights, e.g. {', '.join(tags) or 'resnetv2_50x1_bit.goog_in21k'}")
        return name if name.startswith("timm/") else f"{TIMM_ORG}/{name}"
    return name


def _client():
    try:
        import huggingface_hub
    except ImportError:
        raise UserError(f"hub model names need the huggingface_hub package: {INSTALL_HINT}") from None
    return huggingface_hub


def fetch(repo: str, filename: str, required: bool = True) -> Path | None:
    """A file of a hub repository from huggingface_hub's cache, downloading it unless HF_HUB_OFFLINE is set."""
    hub = _client()
    from huggingface_hub import errors

    try:
        return Path(hub.hf_hub_download(repo, filename))
    except errors.EntryNotFoundError:
        if required:
            raise DownloadError(f"{repo} on the hub has no {filename}") from None
        return None
    except errors.LocalEntryNotFoundError:
        if required:
            raise DownloadError(f"{repo}/{filename}: {_not_cached(hub, repo)}") from None
        return None
    except errors.RepositoryNotFoundError:
        raise DownloadError(f"no hub repository {repo!r} (or it is private: log in with 'hf auth login')") from None
    except (errors.HfHubHTTPError, OSError) as e:
        raise DownloadError(f"{repo}/{filename}: download failed ({type(e).__name__}: {e})") from None


def fetch_weights(repo: str) -> Path:
    """The weights file of a hub repository, with its config files fetched beside it (same snapshot folder)."""
    for name in (CONFIG_FILE, PREPROCESSOR_FILE):
        fetch(repo, name, required=False)
    for name in HF_WEIGHT_FILES:
        path = fetch(repo, name, required=False)
        if path is not None:
            return path
    raise DownloadError(f"{repo}: no {' or '.join(HF_WEIGHT_FILES)}; {_not_cached(_client(), repo)}")


def _not_cached(hub, repo: str) -> str:
    why = "downloads are off (HF_HUB_OFFLINE)" if hub.constants.HF_HUB_OFFLINE else "the hub could not be reached"
    return (f"not in the hub cache ({hub.constants.HF_HUB_CACHE}) and {why}; on a connected machine run "
            f"'hf download {repo}' and copy the cache, or set HF_HUB_CACHE")


def describe(name: str) -> tuple[str, int, dict[str, Any] | None]:
    """(architecture name, classes, data config or None) of a hub name; unknown repositories: from config.json."""
    repo = hub_repo(name)
    table = timm_models()
    short = repo.removeprefix(f"{TIMM_ORG}/")
    if short in table:
        entry = table[short]
        return entry["arch"], entry["num_classes"], entry["data_config"]
    if repo in HF_KNOWN:
        arch, classes = HF_KNOWN[repo]
        return arch, classes, None
    config_path = fetch(repo, CONFIG_FILE)
    arch, classes = arch_from_config(read_json(config_path), f"{repo}/{CONFIG_FILE}")
    return arch.name, classes, None
