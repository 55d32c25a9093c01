"""torch.hub entry points: `torch.hub.load(REPO_DIR, "bit_mini", source="local")` from a checkout.

From GitHub, `torch.hub.load("OWNER/bigtransfer", "create_model", "BiT-M-R50x1", num_classes=10)` works the same
way. The package lives under src/, so a checkout that was not pip-installed puts it on the path first.
"""

import sys
from pathlib import Path

dependencies = ["torch", "numpy", "PIL", "safetensors", "tqdm"]

try:
    import bigtransfer
except ImportError:  # a plain checkout, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    import bigtransfer


def create_model(name: str, num_classes: int | None = None, pretrained=None, **kwargs):
    """Any model bigtransfer knows: released BiT names, bundled models, R<depth>x<width>, timm and HF hub names."""
    return bigtransfer.create_model(name, num_classes=num_classes, pretrained=pretrained, **kwargs)


def bit_mini(pretrained: bool = True, num_classes: int | None = None, **kwargs):
    """BiT-Mini-R26x0.5, the small model bundled with the package (no download); see docs/models/BiT-Mini.md."""
    return bigtransfer.create_model("BiT-Mini-R26x0.5", num_classes=num_classes, pretrained=pretrained, **kwargs)


def bit_m_r50x1(pretrained: bool = True, num_classes: int | None = None, **kwargs):
    """BiT-M-R50x1 (ImageNet-21k upstream), downloaded once into the bigtransfer cache."""
    return bigtransfer.create_model("BiT-M-R50x1", num_classes=num_classes, pretrained=pretrained, **kwargs)
