"""bigtransfer: Big Transfer (BiT) in PyTorch."""

from .core.version import __version__
from .deploy.inference import Prediction, predict
from .deploy.inference_model import prepare_for_inference
from .model.checkpoints import CheckpointError, read_checkpoint, save_checkpoint
from .model.factory import create_model
from .model.preprocess import create_transform, resolve_data_config
from .model.registry import list_models
from .model.resnetv2 import ResNetV2, StdConv2d, count_parameters, parse_arch
from .transfer.finetune import FinetuneConfig, run_finetune
from .transfer.hyperrule import make_plan
from .transfer.lr_scheduler import HyperRuleLR

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
