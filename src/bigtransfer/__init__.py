"""bigtransfer: Big Transfer (BiT) in PyTorch."""

from .checkpoints import CheckpointError, read_checkpoint, save_checkpoint
from .factory import create_model
from .fast import prepare_for_inference
from .finetune import FinetuneConfig, run_finetune
from .hyperrule import make_plan
from .inference import Prediction, predict
from .lr_scheduler import HyperRuleLR
from .models import ResNetV2, StdConv2d, count_parameters, parse_arch
from .preprocess import create_transform, resolve_data_config
from .registry import list_models

__version__ = "0.1.0"

__all__ = [
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
