"""Bundled models carry recommended fine-tuning settings; released models keep the HyperRule exactly."""

import json

import pytest
import torch

from bigtransfer.cli import main
from bigtransfer.model import registry
from bigtransfer.model.checkpoints import save_checkpoint
from bigtransfer.model.resnetv2 import ResNetV2
from bigtransfer.transfer.finetune import FinetuneConfig, recommended_settings
from bigtransfer.transfer.hyperrule import BASE_LR, make_plan

from .test_finetune import make_image_folder


@pytest.fixture
def bundled(tmp_path, monkeypatch):
    """A tiny 'bundled' model that recommends base lr 0.25 and 36/32 px."""
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.manual_seed(0)
    model = ResNetV2("R14x0.5", 7)
    save_checkpoint(model, folder / "Tiny-R14x0.5.safetensors",
                    finetune_defaults={"base_lr": 0.25, "resolution": [36, 32]})
    monkeypatch.setattr(registry, "BUNDLED_DIR", folder)
    return "Tiny-R14x0.5"


def test_released_models_keep_the_hyperrule_and_bundled_ones_bring_their_own(bundled):
    assert recommended_settings("BiT-M-R50x1") == {"base_lr": BASE_LR}
    assert recommended_settings("R26x0.5") == {"base_lr": 0.003}
    assert recommended_settings(bundled) == {"base_lr": 0.25, "resolution": [36, 32]}


def test_finetune_uses_the_recommended_settings_unless_given(bundled, tmp_path):
    data = make_image_folder(tmp_path / "data")
    base = ["finetune", "--data", str(data), "--model", bundled, "--steps", "2", "--batch", "4", "--workers", "0",
            "--quiet"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    settings = json.loads((tmp_path / "a" / "config.json").read_text())["settings"]
    assert settings["base_lr"] == 0.25 and settings["resolution"] == [36, 32]
    assert main([*base, "--out", str(tmp_path / "b"), "--base-lr", "0.01", "--resolution", "40", "32"]) == 0
    settings = json.loads((tmp_path / "b" / "config.json").read_text())["settings"]
    assert settings["base_lr"] == 0.01 and settings["resolution"] == [40, 32]


def test_a_released_name_plans_exactly_as_the_hyperrule(tmp_path):
    data = make_image_folder(tmp_path / "data")
    c = FinetuneConfig(data=str(data), out=str(tmp_path / "run"), model="BiT-M-R50x1").normalized()
    assert c.base_lr == BASE_LR and c.resolution is None
    plan = make_plan(1000, (64, 64), batch=512, base_lr=c.base_lr, arch=c.model)
    assert (plan.precrop, plan.crop, plan.peak_lr) == (160, 128, 0.003)
