"""The BiT architecture: parameter counts, exact forward against independent computations."""

import numpy as np
import pytest
import torch

from bigtransfer import ResNetV2, count_parameters, create_model, list_models, parse_arch
from bigtransfer.model.checkpoints import hf_to_state, load_state
from bigtransfer.model.registry import RELEASED

from .bit_reference import random_authors_arrays, reference_logits

# Spec section 1: millions of parameters (backbone, with a 1000-class head).
SPEC_PARAMS = {
    "R50x1": (23.5, 25.55), "R50x3": (211.2, 217.3), "R101x1": (42.5, 44.5),
    "R101x3": (381.8, 387.9), "R152x2": (232.2, 236.3), "R152x4": (928.3, 936.5),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("name", sorted(n for n in RELEASED if n.startswith(("BiT-S-", "BiT-M-")) and n.count("-") == 2))
def test_released_names_have_spec_parameter_counts(name):
    info = RELEASED[name]
    with torch.device("meta"):
        model = ResNetV2(info.arch, info.num_classes)
    backbone, with_1000 = SPEC_PARAMS[info.arch.name]
    assert count_parameters(model, include_head=False) / 1e6 == pytest.approx(backbone, abs=0.051)
    head_1000 = model.feature_dim * 1000 + 1000
    assert (count_parameters(model, include_head=False) + head_1000) / 1e6 == pytest.approx(with_1000, abs=0.051)
    expected_head = 1000 if name.startswith("BiT-S") else 21843
    assert model.num_classes == expected_head


def test_twelve_released_names_listed():
    names = list_models()
    for arch in SPEC_PARAMS:
        assert f"BiT-S-{arch}" in names and f"BiT-M-{arch}" in names
    assert "R26x0.5" in names and "R14x1" in names


@pytest.mark.parametrize("bad", ["R49x1", "R50", "resnet50", "R50x0.3", "R50x0"])
def test_bad_architecture_names_are_rejected(bad):
    with pytest.raises(ValueError):
        parse_arch(bad)


def test_small_variants_shapes_and_output_stride():
    model = ResNetV2("R26x0.5", 7).eval()
    assert model.feature_dim == 1024 and model.num_classes == 7
    x = torch.randn(2, 3, 128, 96)
    maps = model.forward_stages(x)
    assert [tuple(m.shape[1:]) for m in maps] == [(32, 32, 24), (128, 32, 24), (256, 16, 12), (512, 8, 6), (1024, 4, 3)]
    assert model.forward_maps(x).shape == (2, 1024, 4, 3)
    assert model.forward_features(x).shape == (2, 1024)
    assert model(x).shape == (2, 7)
    # A new model's head is exactly zero, so its logits are exactly zero.
    assert torch.count_nonzero(model(x)) == 0


@pytest.mark.parametrize("depth,width,size", [(50, 1, 64), (101, 1, 32), (26, 0.5, 80)])
def test_authors_layout_checkpoint_matches_independent_forward(tmp_path, depth, width, size):
    arrays = random_authors_arrays(depth, width, classes=11, seed=depth)
    path = tmp_path / "ckpt.npz"
    np.savez(path, **arrays)
    name = f"R{depth}x{width:g}"
    model = create_model(name, pretrained=path).eval()
    assert model.num_classes == 11 and model.ws_eps == 1e-10
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(depth)) * 2 - 1
    ref = reference_logits(arrays, x, depth)
    with torch.no_grad():
        # float32 through 101 layers: up to 7e-5 over 60 random inputs on one CPU, so 2e-4 for other CPUs' kernels.
        assert _rel(model(x), ref) < 2e-4
        assert _rel(model.double()(x.double()), ref) < 1e-5  # same precision: the architecture is exact


def test_conv_spelling_with_numeric_suffix_loads(tmp_path):
    arrays = random_authors_arrays(14, 0.5, classes=3, seed=1, conv_suffix="_1")
    path = tmp_path / "re-exported.npz"
    np.savez(path, **arrays)
    model = create_model("R14x0.5", pretrained=path).eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert _rel(model.double()(x.double()), reference_logits(arrays, x, 14)) < 1e-5  # same precision: exact


def test_matches_hf_transformers_bit():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.BitForImageClassification(transformers.BitConfig(num_labels=5)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)
    ours = ResNetV2("R50x1", 5, ws_eps=1e-8).eval()
    load_state(ours, hf_to_state(hf.state_dict()), "hf")
    x = torch.rand(2, 3, 96, 96) * 2 - 1
    with torch.no_grad():
        assert _rel(ours(x), hf(x).logits) < 1e-5
        # Pre-logits too: HF's pooled output is the same vector.
        pooled = hf.bit(x).pooler_output.flatten(1)
        assert _rel(ours.forward_features(x), pooled) < 1e-5


def test_zero_pad_then_pool_differs_from_padded_pool():
    # The root's detail matters: with negative conv outputs, -inf padding would give other values.
    model = ResNetV2("R14x0.5", 2)
    with torch.no_grad():
        model.root.conv.weight.normal_()
        x = torch.randn(1, 3, 32, 32)
        conv = model.root.conv(x)
        ours = model.root(x)
        other = torch.nn.functional.max_pool2d(conv, 3, 2, padding=1)
    assert ours.shape == other.shape
    assert not torch.equal(ours, other)
    assert ours.min() >= 0 or conv.min() < 0  # zero padding clamps border maxima at >= 0
    assert float(ours[0, :, 0, 0].min()) >= 0.0


def test_reset_head_and_create_model_head_rules(tmp_path):
    arrays = random_authors_arrays(14, 0.5, classes=4, seed=3)
    path = tmp_path / "c.npz"
    np.savez(path, **arrays)
    kept = create_model("R14x0.5", pretrained=path)
    assert kept.num_classes == 4 and torch.count_nonzero(kept.head.weight) > 0
    same = create_model("R14x0.5", num_classes=4, pretrained=path)
    assert torch.equal(same.head.weight, kept.head.weight)
    new = create_model("R14x0.5", num_classes=9, pretrained=path)
    assert new.num_classes == 9
    assert torch.count_nonzero(new.head.weight) == 0 and torch.count_nonzero(new.head.bias) == 0
    assert torch.equal(new.root.conv.weight, kept.root.conv.weight)
    kept.reset_head(2)
    assert kept.num_classes == 2 and torch.count_nonzero(kept.head.weight) == 0


def test_released_name_without_network_fails_fast_with_hint():
    from bigtransfer.model.downloads import DownloadError

    with pytest.raises(DownloadError, match="BiT-M-R50x1.npz"):
        create_model("BiT-M-R50x1")
    # Random weights need no download.
    assert create_model("BiT-S-R50x1", pretrained=False).num_classes == 1000


def test_unknown_model_name_lists_choices():
    with pytest.raises(ValueError, match="BiT-M-R50x1"):
        create_model("BiT-X-R50x1")
