"""Packed image sets: decoding a shard set once, reading it back, and the batched crop/flip against slicing."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from bigtransfer.cli import main
from bigtransfer.data.packed import PackedError, crop_flip_batch, open_packed, pack_shards, squash_batch
from bigtransfer.data.pretraining import InceptionCrop, eval_batches, load_pretrain_data, train_batches
from bigtransfer.data.shards import ShardWriter

CLASSES = ["a", "b", "c", "d"]


def picture(i: int, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def write_corpus(root, n_train: int = 10, n_val: int = 4) -> dict[str, list[tuple[np.ndarray, list[int]]]]:
    made = {}
    for split, n in (("train", n_train), ("val", n_val)):
        rows = [(picture(i + (100 if split == "val" else 0)), sorted({i % 4, (i * 3 + 1) % 4})) for i in range(n)]
        with ShardWriter(root / split, CLASSES, prefix=split, max_count=3) as w:
            for k, (a, labels) in enumerate(rows):
                w.write(f"s{k:03d}", png(a), labels)
        made[split] = rows
    return made


def test_pack_round_trips_pixels_and_labels_and_the_cli_packs_a_corpus(tmp_path, capsys):
    made = write_corpus(tmp_path / "corpus")
    assert main(["pack", str(tmp_path / "corpus"), str(tmp_path / "packed")]) == 0
    assert "10 images" in capsys.readouterr().out
    for split, rows in made.items():
        packed = open_packed(tmp_path / "packed" / split)
        assert packed.classes == CLASSES and packed.multi_label and len(packed) == len(rows)
        for i, (a, labels) in enumerate(rows):
            assert np.array_equal(packed.images[i], a)  # PNG is lossless: the decoded bytes are the originals
            assert packed.labels(i) == labels
        target = packed.targets([1, 0])
        assert target[0, made[split][1][1]].tolist() == [1.0] * len(made[split][1][1]) and target.sum() == (
            len(made[split][0][1]) + len(made[split][1][1]))


def test_pack_refuses_an_existing_output_and_a_damaged_set_is_named(tmp_path):
    write_corpus(tmp_path / "c")
    out = pack_shards(tmp_path / "c" / "train", tmp_path / "p")
    with pytest.raises(PackedError, match="already exists"):
        pack_shards(tmp_path / "c" / "train", tmp_path / "p")
    offsets = np.load(out / "label_offsets.npy")
    np.save(out / "label_offsets.npy", offsets[:-1])
    with pytest.raises(PackedError, match=str(out)):
        open_packed(out)
    (out / "packed.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(PackedError, match="bigtransfer pack"):
        open_packed(out)


def test_crop_flip_batch_equals_slicing_where_no_resampling_is_needed():
    a = torch.from_numpy(np.stack([picture(1), picture(2)])).permute(0, 3, 1, 2)
    scaled = a.float() / 127.5 - 1
    out = crop_flip_batch(a, [(0, 0, 16, 16), (4, 2, 12, 10)], [False, True], 8)
    whole = crop_flip_batch(a[:1], [(0, 0, 16, 16)], [False], 16)
    assert torch.allclose(whole[0], scaled[0], atol=1e-5)
    assert torch.allclose(out[1], scaled[1, :, 2:10, 4:12].flip(2), atol=1e-5)
    # A 2x shrink without antialiasing samples between pixel pairs: the mean of each 2x2 block.
    expected = scaled[0].reshape(3, 8, 2, 8, 2).mean(dim=(2, 4))
    assert torch.allclose(out[0], expected, atol=1e-5)


def test_crop_flip_batch_is_close_to_pillow_when_enlarging():
    a = picture(5, 24)
    box, size = (3, 5, 15, 17), 30
    ref = torch.from_numpy(np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR, box=box), dtype=np.float32))
    ours = crop_flip_batch(torch.from_numpy(a[None]).permute(0, 3, 1, 2), [box], [False], size)[0]
    ours = (ours.permute(1, 2, 0) + 1) * 127.5
    inner = (slice(2, -2), slice(2, -2))  # Pillow clamps its filter at the box edge, grid_sample at the image edge
    assert (ours[inner] - ref[inner]).abs().max() < 1.01  # Pillow: fixed-point weights, rounded to integers


def test_packed_training_stream_is_seeded_resumable_and_draws_inception_crops(tmp_path):
    write_corpus(tmp_path / "c", n_train=12)
    assert main(["pack", str(tmp_path / "c"), str(tmp_path / "p")]) == 0
    data = load_pretrain_data(tmp_path / "p")
    assert data.train_count == 12 and data.eval is not None and "packed set" in data.summary()
    full = list(train_batches(data, 8, 4, seed=3, rank=0, world_size=1, batch_split=1, start_step=0, end_step=4,
                              workers=0))
    resumed = list(train_batches(data, 8, 4, 3, 0, 1, 1, 2, 4, 0))
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(full[2:], resumed, strict=True))
    halves = list(train_batches(data, 8, 4, 3, 1, 2, 1, 0, 4, 0))  # rank 1 of 2 gets the second half of each step
    assert torch.equal(halves[0][0], full[0][0][2:])
    # Example 0 of step 0 is the crop and flip InceptionCrop draws from that example's seed.
    from bigtransfer.data.sampling import batch_indices, sample_seed

    row = batch_indices(0, 12, 4, 3)[0]
    box, flip = InceptionCrop.draw(16, 16, torch.Generator().manual_seed(sample_seed(3, 0, 0)))
    expected = crop_flip_batch(data.train.pixels([row]), [box], [flip], 8)[0]
    assert torch.equal(full[0][0][0], expected) and torch.equal(full[0][1][0], data.train.targets([row])[0])
    held = list(eval_batches(data, 8, 3, 0, 1, 0))
    assert sum(len(x) for x, _ in held) == 4
    assert torch.allclose(held[0][0], squash_batch(data.eval.pixels([0, 1, 2]), 8))


def test_pretrain_runs_on_a_packed_corpus(tmp_path):
    write_corpus(tmp_path / "c", n_train=12)
    main(["pack", str(tmp_path / "c"), str(tmp_path / "p")])
    assert main(["pretrain", "--data", str(tmp_path / "p"), "--model", "R14x0.5", "--out", str(tmp_path / "run"),
                 "--resolution", "32", "--batch", "4", "--steps", "2", "--loss", "softmax", "--workers", "0",
                 "--quiet"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval_examples"] == 4
