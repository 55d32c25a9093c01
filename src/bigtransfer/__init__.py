"""bigtransfer: Big Transfer (BiT) in PyTorch."""

from .checkpoints import CheckpointError, read_checkpoint, save_checkpoint
from .factory import create_model
from .fast import prepare_for_inference
from .models import ResNetV2, StdConv2d, count_parameters, parse_arch
from .registry import list_models

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ResNetV2",
    "StdConv2d",
    "count_parameters",
    "create_model",
    "list_models",
    "parse_arch",
    "prepare_for_inference",
    "read_checkpoint",
    "save_checkpoint",
]
