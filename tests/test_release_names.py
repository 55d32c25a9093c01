"""The distillation and VTAB-1k releases by name: every name, its head and resolution, its URL, and its layout loading."""

import numpy as np
import pytest
import torch

from bigtransfer import create_model, list_models
from bigtransfer.cli import main
from bigtransfer.core.errors import UserError
from bigtransfer.evaluation.vtab_tasks import get_task
from bigtransfer.model.downloads import cache_dir
from bigtransfer.model.preprocess import resolution_of
from bigtransfer.model.registry import BASE_URL, RELEASED, resolve
from bigtransfer.model.resnetv2 import ResNetV2, count_parameters

from .bit_reference import random_authors_arrays, reference_logits
from .test_zoo import _Server, online  # noqa: F401 (a fixture)

# Spec section 8 and the authors' README spell the 19 tasks of the VTAB release like this (dsprites-xpos, not
# VTAB's dsprites-location).
README_TASKS = ("caltech101,diabetic_retinopathy,dtd,oxford_flowers102,oxford_iiit_pet,resisc45,sun397,cifar100,"
                "eurosat,patch_camelyon,smallnorb-elevation,svhn,dsprites-orientation,smallnorb-azimuth,"
                "clevr-distance,clevr-count,dmlab,kitti-distance,dsprites-xpos").split(",")
VTAB_ARCHS = ("R50x1", "R101x1", "R50x3", "R101x3", "R152x4")


def test_every_released_vtab_and_distilled_name_is_listed_with_its_head():
    names = [n for n in list_models() if n.startswith("vtab/")]
    expected = {f"vtab/BiT-M-{a}-run{r}-{t}" for a in VTAB_ARCHS for r in range(3) for t in README_TASKS}
    assert len(names) == len(set(names)) == 285 and set(names) == expected
    for name in names:
        info = resolve(name)
        task = name.rsplit("-run", 1)[1][2:]
        vtab = get_task("dsprites-location" if task == "dsprites-xpos" else task)  # the benchmark's own table
        assert info.num_classes == vtab.num_classes, name
        assert info.arch.name == name.split("-")[2]
        assert info.url == f"{BASE_URL}{name}.npz"
    distilled = {n: resolve(n) for n in list_models() if n.startswith("distill/")}
    assert {n: (i.arch.name, i.num_classes) for n, i in distilled.items()} == {
        "distill/R50x1_224": ("R50x1", 1000), "distill/R50x1_160": ("R50x1", 1000),
        "distill/R152x2_T_224": ("R152x2", 1000), "distill/R152x2_T_384": ("R152x2", 1000)}
    assert all(i.url == f"{BASE_URL}{n}.npz" for n, i in distilled.items())


@pytest.mark.parametrize("name,size", [("distill/R50x1_224", 224), ("distill/R50x1_160", 160),
                                       ("distill/R152x2_T_384", 384), ("vtab/BiT-M-R50x1-run0-cifar100", 128),
                                       ("vtab/BiT-M-R50x3-run1-dsprites-xpos", 128),
                                       ("vtab/BiT-M-R152x4-run2-caltech101", 480)])
def test_expected_resolution_rides_with_the_name(name, size):
    assert resolution_of(resolve(name).data_config) == size
    with torch.device("meta"):  # the model as create_model builds it, without filling R152x4's weights
        assert resolution_of(create_model(name, pretrained=False).data_config) == size


def test_teachers_have_the_spec_parameter_count():
    with torch.device("meta"):
        model = ResNetV2(resolve("distill/R152x2_T_384").arch, 1000)
    assert count_parameters(model) / 1e6 == pytest.approx(236.3, abs=0.051)  # spec section 1, 1000-class head


@pytest.mark.parametrize("name,depth,classes", [("distill/R50x1_160", 50, 1000),
                                                ("vtab/BiT-M-R50x1-run2-dsprites-xpos", 50, 16)])
def test_released_files_in_their_layout_load_from_their_url(tmp_path, online, monkeypatch, name, depth,  # noqa: F811
                                                            classes):
    arrays = random_authors_arrays(depth, 1, classes=classes, seed=depth + classes)
    np.savez(tmp_path / "src.npz", **arrays)
    body = (tmp_path / "src.npz").read_bytes()
    with _Server({f"{name.rsplit('/', 1)[1]}.npz": body}) as srv:
        monkeypatch.setenv("BIGTRANSFER_BASE_URL", srv.url)
        model = create_model(name, progress=False).eval()
        assert srv.paths == [f"/bucket/{name}.npz"]  # the release's sub-folder, not the bucket's top
    assert (cache_dir() / f"{name}.npz").is_file()
    assert model.num_classes == classes
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = reference_logits(arrays, x, depth)
        assert float((model.double()(x.double()) - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("bad", ["vtab/BiT-M-R50x1-run0-dsprites-location", "distill/R50x1", "vtab/BiT-M-R50x1"])
def test_a_misspelt_release_name_is_refused_with_the_close_ones(bad):
    with pytest.raises(UserError, match="bigtransfer models --filter") as e:
        resolve(bad)
    if bad == "distill/R50x1":
        assert "distill/R50x1_224" in str(e.value)


def test_models_filter_by_part_and_by_glob(capsys):
    assert main(["models", "--filter", "distill"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split()[0] for r in rows] == ["distill/R50x1_224", "distill/R50x1_160", "distill/R152x2_T_224",
                                            "distill/R152x2_T_384", "resnetv2_50x1_bit.goog_distilled_in1k"]
    assert rows[1].split()[1:4] == ["R50x1", "1000", "160"]
    assert main(["models", "--filter", "VTAB/*R101x3*RUN1*"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert len(rows) == 19 and all(r.startswith("vtab/BiT-M-R101x3-run1-") for r in rows)
    assert main(["models", "--filter", "no-such-model"]) == 2
    assert "no model name matches 'no-such-model'" in capsys.readouterr().err
    assert len([n for n in RELEASED if n.startswith("vtab/")]) == 285
