"""Peer implementations of BiT (HF transformers, timm when importable) holding exactly our model's weights."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping

import torch
from torch import nn

from bigtransfer.model.checkpoints import hf_to_state, timm_to_state
from bigtransfer.model.resnetv2 import WS_EPS_PEERS, ResNetV2

PEER_WS_EPS = WS_EPS_PEERS  # both peers standardize with 1e-8; our model is built with the same eps


def _copy_weights(peer: nn.Module, ours: ResNetV2, to_ours: Callable[[Mapping[str, torch.Tensor], str], dict]) -> None:
    """Fill every peer tensor from ours, finding each key's counterpart through the converter."""
    src = ours.state_dict()
    with torch.no_grad():
        for key, t in peer.state_dict().items():
            if key.endswith("num_batches_tracked"):
                continue
            (our_key, _), = to_ours({key: t}, "peer").items()
            t.copy_(src[our_key].reshape(t.shape))


def hf_bit(ours: ResNetV2) -> nn.Module:
    """HF transformers' BitForImageClassification with the same architecture and weights as `ours`."""
    try:
        import transformers
    except ImportError as e:  # a benchmark extra, never a runtime dependency
        raise SystemExit("the benchmark needs HF transformers: pip install -e '.[test]'") from e
    w = ours.arch.width
    # global_padding=None gives symmetric padding 3 on the root conv and 1 on the 3x3s, and a zero pad of 1
    # before an unpadded max-pool: the authors' (and our) architecture. The hub configs use TF 'SAME'.
    cfg = transformers.BitConfig(layer_type="preactivation", global_padding=None, embedding_dynamic_padding=False,
                                 depths=list(ours.arch.units), embedding_size=int(64 * w),
                                 hidden_sizes=[int(c * w) for c in (256, 512, 1024, 2048)],
                                 num_labels=ours.num_classes)
    peer = transformers.BitForImageClassification(cfg).eval()
    _copy_weights(peer, ours, hf_to_state)
    return peer


def timm_available() -> bool:
    """Whether timm is installed (it is optional and never a dependency)."""
    return importlib.util.find_spec("timm") is not None


def timm_bit(ours: ResNetV2) -> nn.Module:
    """timm's resnetv2_<depth>x<width>_bit with the same weights as `ours` (call only when timm_available())."""
    timm = importlib.import_module("timm")
    name = f"resnetv2_{ours.arch.depth}x{int(ours.arch.width)}_bit"
    peer = timm.create_model(name, pretrained=False, num_classes=ours.num_classes).eval()
    _copy_weights(peer, ours, timm_to_state)
    return peer


def hf_logits(peer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable giving the HF model's logits tensor for an input batch."""
    return lambda x: peer(pixel_values=x).logits
