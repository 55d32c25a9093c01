"""Names that create_model accepts: released BiT checkpoints, bundled models and bare architectures."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import UserError
from .preprocess import data_config, meta_data_config
from .resnetv2 import RELEASED_ARCHS, Arch, parse_arch

BASE_URL = "https://storage.googleapis.com/bit_models/"
UPSTREAM_CLASSES = {"BiT-S": 1000, "BiT-M": 21843}
LABEL_FILES = {
    "imagenet21k": "imagenet21k_wordnet_lemmas.txt",
    "imagenet21k_ids": "imagenet21k_wordnet_ids.txt",
    "ilsvrc2012": "ilsvrc2012_wordnet_lemmas.txt",
}
# Small architectures for tests and CPU work; any R<depth>x<width> is accepted as well.
SMALL_ARCHS = ("R14x0.5", "R14x1", "R26x0.5", "R26x1")
BUNDLED_DIR = Path(__file__).parent.parent / "weights"


@dataclass(frozen=True)
class ModelInfo:
    """What a model name stands for."""

    name: str
    arch: Arch
    num_classes: int
    url: str | None = None  # released weights in the authors' bucket
    path: Path | None = None  # weights that ship inside the package
    labels: str | None = None  # key of LABEL_FILES
    sha256: str | None = None  # of the released file, where known: a download must match it
    # Fine-tuning settings the model's authors recommend (bundled models: "finetune_defaults" in the file's
    # metadata, e.g. {"base_lr": 0.1, "resolution": [48, 40]}); a run uses them unless told otherwise.
    finetune_defaults: dict = field(default_factory=dict, compare=False)
    hub: str | None = None  # a Hugging Face hub repository holding the weights (timm or HF transformers files)
    # How its inputs are prepared (bigtransfer.model.preprocess), where the name says; None: the weights' file decides.
    data_config: dict | None = field(default=None, compare=False)

    @property
    def has_weights(self) -> bool:
        return self.url is not None or self.path is not None or self.hub is not None


def _released() -> dict[str, ModelInfo]:
    out: dict[str, ModelInfo] = {}
    for arch in RELEASED_ARCHS:
        for kind, classes in UPSTREAM_CLASSES.items():
            name = f"{kind}-{arch}"
            labels = "ilsvrc2012" if kind == "BiT-S" else "imagenet21k"
            out[name] = ModelInfo(name, parse_arch(arch), classes, url=f"{BASE_URL}{name}.npz", labels=labels)
        # Fine-tuned models evaluate at the HyperRule's crop of their task (spec section 3): ImageNet's images are
        # large (480 px), CIFAR-10's small (128 px). Upstream models record none: their task is not known yet.
        name = f"BiT-M-{arch}-ILSVRC2012"
        out[name] = ModelInfo(name, parse_arch(arch), 1000, url=f"{BASE_URL}{name}.npz", labels="ilsvrc2012",
                              data_config=data_config(480))
    out["BiT-M-R50x1-CIFAR10"] = ModelInfo("BiT-M-R50x1-CIFAR10", parse_arch("R50x1"), 10,
                                           url=f"{BASE_URL}BiT-M-R50x1-CIFAR10.npz", data_config=data_config(128))
    return out


RELEASED: dict[str, ModelInfo] = _released()


def _bundled() -> dict[str, ModelInfo]:
    """Models trained by this project that ship as safetensors inside the package."""
    out: dict[str, ModelInfo] = {}
    if BUNDLED_DIR.is_dir():
        from .checkpoints import read_metadata  # local import: checkpoints imports this module

        for path in sorted(BUNDLED_DIR.glob("*.safetensors")):
            meta = read_metadata(path)
            defaults = json.loads(meta.get("finetune_defaults", "{}"))
            out[path.stem] = ModelInfo(path.stem, parse_arch(meta["arch"]), int(meta["num_classes"]), path=path,
                                       finetune_defaults=defaults, data_config=meta_data_config(meta, path))
    return out


def list_models() -> list[str]:
    """Every name create_model accepts, besides any R<depth>x<width> architecture and hub repository 'org/name'."""
    from .hub import HF_KNOWN, timm_models  # local import: hub imports this module (through downloads)

    archs = list(RELEASED_ARCHS) + [a for a in SMALL_ARCHS if a not in RELEASED_ARCHS]
    return list(RELEASED) + list(_bundled()) + archs + list(timm_models()) + list(HF_KNOWN)


def resolve(name: str) -> ModelInfo:
    """Look up a model name: released, bundled, a bare architecture (1000-class head), or a hub name."""
    if name in RELEASED:
        return RELEASED[name]
    bundled = _bundled()
    if name in bundled:
        return bundled[name]
    from . import hub  # local import: hub fetches through zoo, which imports this module

    if hub.is_hub_name(name):
        if Path(name).exists():
            raise UserError(f"{name!r} is a local file or folder, not a model name; pass it as --weights PATH "
                            "(pretrained=PATH in Python)")
        arch, classes, config = hub.describe(name)
        return ModelInfo(name, parse_arch(arch), classes, hub=hub.hub_repo(name), data_config=config)
    try:
        arch = parse_arch(name)
    except ValueError:
        raise UserError(
            f"unknown model {name!r}; choose one of {', '.join(list_models())}, any R<depth>x<width> or a hub "
            "repository 'org/name'"
        ) from None
    return ModelInfo(name, arch, 1000)
