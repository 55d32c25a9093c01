"""augment="robust": each extra view against a hand computation, its draw order, and its place in the packed stream."""

from __future__ import annotations

import json

import pytest
import torch

from bigtransfer.cli import main
from bigtransfer.data import pretraining as pt
from bigtransfer.data.pretraining import load_pretrain_data, robust_view, robust_views, train_batches
from bigtransfer.upstream.config import AUGMENTS, PretrainConfig

from .test_packed import write_corpus

ONLY = {"elastic": ("ELASTIC_P",), "lowres": ("LOWRES_P",), "grey": ("GREY_P",), "invert": ("INVERT_P",)}


def only(monkeypatch, *views: str) -> None:
    """Make the named views certain and every other one impossible."""
    for view, (name,) in ONLY.items():
        monkeypatch.setattr(pt, name, 1.0 if view in views else 0.0)


def image(seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_no_view_is_the_identity_and_each_view_matches_its_hand_computation(monkeypatch):
    x = image()
    only(monkeypatch)
    assert torch.equal(robust_view(x, torch.Generator().manual_seed(1)), x)
    only(monkeypatch, "invert")
    assert torch.equal(robust_view(x, torch.Generator().manual_seed(1)), -x)
    only(monkeypatch, "grey")
    grey = robust_view(x, torch.Generator().manual_seed(1))
    luma = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
    assert all(torch.allclose(grey[c], luma, atol=1e-6) for c in range(3))


def test_low_resolution_averages_a_fine_checkerboard_away_and_keeps_a_flat_image(monkeypatch):
    only(monkeypatch, "lowres")
    monkeypatch.setattr(pt, "LOWRES_SIZES", (8, 8))
    ii, jj = torch.meshgrid(torch.arange(48), torch.arange(48), indexing="ij")
    board = ((ii + jj) % 2 * 2 - 1).float().expand(3, 48, 48)  # +-1 at one-pixel period: mean 0
    assert robust_view(board, torch.Generator().manual_seed(0)).abs().max() < 0.02
    flat = torch.full((3, 48, 48), 0.25)
    assert torch.allclose(robust_view(flat, torch.Generator().manual_seed(0)), flat, atol=1e-6)


def test_elastic_warp_of_zero_amplitude_is_the_identity_and_a_warp_moves_pixels_but_not_a_flat_image(monkeypatch):
    only(monkeypatch, "elastic")
    x = image(size=24)
    monkeypatch.setattr(pt, "ELASTIC_MAX", 0.0)
    assert torch.allclose(robust_view(x, torch.Generator().manual_seed(2)), x, atol=1e-5)
    monkeypatch.setattr(pt, "ELASTIC_MAX", 0.12)
    warped = [robust_view(x, torch.Generator().manual_seed(s)) for s in range(4)]
    assert max((w - x).abs().mean().item() for w in warped) > 0.05  # some amplitude U(0, 0.12) moves pixels
    flat = torch.full((3, 24, 24), -0.5)
    assert torch.allclose(robust_view(flat, torch.Generator().manual_seed(3)), flat, atol=1e-6)  # border padding


@pytest.mark.parametrize("seed", range(6))
def test_draws_follow_the_documented_order(seed):
    gen = torch.Generator().manual_seed(seed)
    robust_view(image(), gen)
    ref = torch.Generator().manual_seed(seed)
    torch.rand(3, generator=ref)
    torch.randint(pt.LOWRES_SIZES[0], pt.LOWRES_SIZES[1] + 1, (), generator=ref)
    if float(torch.rand((), generator=ref)) < pt.ELASTIC_P:
        torch.rand((), generator=ref)
        torch.randn(1, 2, pt.ELASTIC_GRID, pt.ELASTIC_GRID, generator=ref)
    assert torch.equal(gen.get_state(), ref.get_state())  # the next image's draws cannot depend on the views


def test_a_batch_gets_exactly_the_views_of_its_images_one_by_one():
    x = torch.rand(64, 3, 24, 24) * 2 - 1  # 64 images: every kind of view and several low-res sides occur
    batched = robust_views(x, [torch.Generator().manual_seed(s) for s in range(64)])
    single = torch.stack([robust_view(x[s], torch.Generator().manual_seed(s)) for s in range(64)])
    assert torch.equal(batched, single)
    assert not torch.equal(batched, x) and torch.equal(robust_views(x[:0], []), x[:0])


def test_every_augment_with_views_is_offered_and_robust_small_draws_its_own_odds(monkeypatch):
    assert AUGMENTS == ("bit", *pt.ROBUST_AUGMENTS)  # the torch-free config names exactly the augments that exist
    small = pt.view_odds("robust-small")
    assert (small.elastic_p, small.lowres_p, small.lowres_sizes) == (0.7, 0.6, (6, 16))
    assert small.grey_p == pt.GREY_P and small.invert_p == pt.INVERT_P and pt.view_odds() == pt.view_odds("robust")
    gens = [torch.Generator().manual_seed(s) for s in range(256)]
    draws = [pt._draw_view(g, small) for g in gens]
    lowres = sum(d.side is not None for d in draws) / 256
    assert 0.5 < lowres < 0.7 and all(6 <= d.side <= 16 for d in draws if d.side is not None)
    assert 0.6 < sum(d.field is not None for d in draws) / 256 < 0.8
    monkeypatch.setattr(pt, "INVERT_P", 1.0)  # module values are read at call time; robust-small keeps invert's
    assert pt.view_odds("robust-small").invert_p == 1.0


def test_packed_stream_applies_the_views_after_the_crop(tmp_path, monkeypatch):
    write_corpus(tmp_path / "c", n_train=12)
    assert main(["pack", str(tmp_path / "c"), str(tmp_path / "p")]) == 0
    data = load_pretrain_data(tmp_path / "p")
    bit = [x for x, _ in train_batches(data, 8, 4, 3, 0, 1, 1, 0, 3, 0)]
    only(monkeypatch, "invert")
    robust = [x for x, _ in train_batches(data, 8, 4, 3, 0, 1, 1, 0, 3, 0, augment="robust")]
    assert all(torch.equal(r, -b) for r, b in zip(robust, bit, strict=True))  # same crops, then the view
    resumed = [x for x, _ in train_batches(data, 8, 4, 3, 0, 1, 1, 1, 3, 0, augment="robust")]
    assert all(torch.equal(r, s) for r, s in zip(robust[1:], resumed, strict=True))


def test_pretrain_records_the_augment_and_a_resume_must_keep_it(tmp_path, capsys):
    write_corpus(tmp_path / "c", n_train=12)
    main(["pack", str(tmp_path / "c"), str(tmp_path / "p")])
    args = ["pretrain", "--data", str(tmp_path / "p"), "--model", "R14x0.5", "--out", str(tmp_path / "run"),
            "--resolution", "32", "--batch", "4", "--steps", "2", "--loss", "softmax", "--workers", "0", "--quiet"]
    assert main([*args, "--augment", "robust", "--stop-after", "1"]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["augment"] == "robust"
    assert main([*args, "--augment", "bit"]) == 2
    assert "augment" in capsys.readouterr().err
    with pytest.raises(ValueError, match="augment must be one of bit, robust, robust-small"):
        PretrainConfig(data="d", out=str(tmp_path / "o"), augment="mixup").validate()
