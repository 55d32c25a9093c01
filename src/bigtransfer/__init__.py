"""bigtransfer: Big Transfer (BiT) in PyTorch.

The public names below load on first use (PEP 562): importing the package, which every `bigtransfer` command does,
must not load torch (about 2 s), so that `bigtransfer --help` answers at once (benchmarks/bench_cli_startup.py).
`from bigtransfer import create_model` works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .core.version import __version__

# public name -> the module that defines it
_PUBLIC = {
    "CheckpointError": ".model.checkpoints",
    "FinetuneConfig": ".transfer.config",
    "HyperRuleLR": ".transfer.lr_scheduler",
    "Prediction": ".deploy.inference",
    "ResNetV2": ".model.resnetv2",
    "StdConv2d": ".model.resnetv2",
    "count_parameters": ".model.resnetv2",
    "create_model": ".model.factory",
    "create_transform": ".model.preprocess",
    "list_models": ".model.registry",
    "make_plan": ".transfer.hyperrule",
    "parse_arch": ".model.resnetv2",
    "predict": ".deploy.inference",
    "prepare_for_inference": ".deploy.inference_model",
    "read_checkpoint": ".model.checkpoints",
    "resolve_data_config": ".model.preprocess",
    "run_finetune": ".transfer.finetune",
    "save_checkpoint": ".model.checkpoints",
}

__all__ = [
    "__version__",
    "CheckpointError",
    "FinetuneConfig",
    "HyperRuleLR",
    "Prediction",
    "ResNetV2",
    "StdConv2d",
    "count_parameters",
    "create_model",
    "create_transform",
    "list_models",
    "make_plan",
    "parse_arch",
    "predict",
    "prepare_for_inference",
    "read_checkpoint",
    "resolve_data_config",
    "run_finetune",
    "save_checkpoint",
]

if TYPE_CHECKING:  # what type checkers and IDEs see: the names themselves
    from .deploy.inference import Prediction, predict
    from .deploy.inference_model import prepare_for_inference
    from .model.checkpoints import CheckpointError, read_checkpoint, save_checkpoint
    from .model.factory import create_model
    from .model.preprocess import create_transform, resolve_data_config
    from .model.registry import list_models
    from .model.resnetv2 import ResNetV2, StdConv2d, count_parameters, parse_arch
    from .transfer.config import FinetuneConfig
    from .transfer.finetune import run_finetune
    from .transfer.hyperrule import make_plan
    from .transfer.lr_scheduler import HyperRuleLR


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'bigtransfer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
