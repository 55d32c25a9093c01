"""Names that create_model accepts: released BiT checkpoints, bundled models and bare architectures."""

from __future__ import annotations

import difflib
import fnmatch
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

# The distillation paper's release (spec section 8), named by their path in the bucket without ".npz":
# name -> (architecture, resolution, crop_pct). All have ILSVRC-2012 heads (1000 classes). Their evaluation
# transform is timm's for the same weights (spec section 7): bicubic, shorter side to R / crop_pct, centre crop R;
# timm has no config for the 160 px student, which is given the 224 px student's crop_pct.
DISTILLED: dict[str, tuple[str, int, float]] = {
    "distill/R50x1_224": ("R50x1", 224, 0.875),
    "distill/R50x1_160": ("R50x1", 160, 0.875),
    "distill/R152x2_T_224": ("R152x2", 224, 0.875),
    "distill/R152x2_T_384": ("R152x2", 384, 1.0),
}
# The BiT-M models fine-tuned on VTAB-1k (spec section 8; the authors' README lists the same 19 names): task as the
# release spells it -> (classes, image area below 96*96). The release says "dsprites-xpos" for the task VTAB calls
# dsprites-location. Class counts are the VTAB tasks' (tests check them against evaluation.vtab_tasks). The release
# states no resolution: recorded here is the HyperRule's evaluation crop for the task's image size (release variant,
# spec section 3: 128 px for images under 96*96 px -- CIFAR-100, SVHN 32 px, EuroSAT and dSprites 64 px -- else 480).
VTAB_RELEASE_TASKS: dict[str, tuple[int, bool]] = {
    "caltech101": (102, False), "diabetic_retinopathy": (5, False), "dtd": (47, False),
    "oxford_flowers102": (102, False), "oxford_iiit_pet": (37, False), "resisc45": (45, False),
    "sun397": (397, False), "cifar100": (100, True), "eurosat": (10, True), "patch_camelyon": (2, False),
    "smallnorb-elevation": (9, False), "svhn": (10, True), "dsprites-orientation": (16, True),
    "smallnorb-azimuth": (18, False), "clevr-distance": (6, False), "clevr-count": (8, False), "dmlab": (6, False),
    "kitti-distance": (4, False), "dsprites-xpos": (16, True),
}
VTAB_RELEASE_ARCHS = ("R50x1", "R101x1", "R50x3", "R101x3", "R152x4")
VTAB_RUNS = 3


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
    for name, (arch, size, crop_pct) in DISTILLED.items():
        out[name] = ModelInfo(name, parse_arch(arch), 1000, url=f"{BASE_URL}{name}.npz", labels="ilsvrc2012",
                              data_config=data_config(size, interpolation="bicubic", crop="center", crop_pct=crop_pct))
    for arch in VTAB_RELEASE_ARCHS:
        for run in range(VTAB_RUNS):
            for task, (classes, small) in VTAB_RELEASE_TASKS.items():
                name = f"vtab/BiT-M-{arch}-run{run}-{task}"
                out[name] = ModelInfo(name, parse_arch(arch), classes, url=f"{BASE_URL}{name}.npz",
                                      data_config=data_config(128 if small else 480))
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


def list_models(pattern: str | None = None) -> list[str]:
    """Every name create_model accepts, besides any R<depth>x<width> architecture and hub repository 'org/name'.

    `pattern` keeps the names it matches (case-insensitive): a glob (``vtab/*R50x1*``) when it holds one of ``*?[``,
    else a part of the name (``vtab``, ``distill``).
    """
    from .hub import HF_KNOWN, timm_models  # local import: hub imports this module (through downloads)

    archs = list(RELEASED_ARCHS) + [a for a in SMALL_ARCHS if a not in RELEASED_ARCHS]
    names = list(RELEASED) + list(_bundled()) + archs + list(timm_models()) + list(HF_KNOWN)
    if pattern is None:
        return names
    if any(ch in pattern for ch in "*?["):
        return [n for n in names if fnmatch.fnmatchcase(n.lower(), pattern.lower())]
    return [n for n in names if pattern.lower() in n.lower()]


def resolve(name: str) -> ModelInfo:
    """Look up a model name: released, bundled, a bare architecture (1000-class head), or a hub name."""
    if name in RELEASED:
        return RELEASED[name]
    bundled = _bundled()
    if name in bundled:
        return bundled[name]
    folder = name.split("/", 1)[0]
    if folder in ("distill", "vtab"):  # the release's folders: a typo here is not a hub repository
        close = difflib.get_close_matches(name, [n for n in RELEASED if n.startswith(folder + "/")], n=3)
        raise UserError(f"unknown model {name!r}; " + (f"did you mean {', '.join(close)}? " if close else "")
                        + f"'bigtransfer models --filter {folder}' lists the released {folder} models")
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
            f"unknown model {name!r}; choose one of {', '.join(n for n in list_models() if '/' not in n)}, a "
            "released distilled or VTAB model ('bigtransfer models --filter distill', '--filter vtab'), any "
            "R<depth>x<width> or a hub repository 'org/name'"
        ) from None
    return ModelInfo(name, arch, 1000)
