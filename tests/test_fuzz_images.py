"""Fuzz-style: seeded, randomly corrupted copies of real images; every file is either loaded or named, never lost."""

import io
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bigtransfer.data.datasets import ImageDataset, eval_transform, load_splits
from bigtransfer.data.shards import ShardDataset, ShardWarning, ShardWriter

SEED = 15


def _originals() -> dict[str, bytes]:
    """Real pixel content in the formats people use: handwritten digits and a smooth photo-like gradient."""
    from sklearn.datasets import load_digits

    digits = load_digits().images[:2]
    out: dict[str, bytes] = {}
    for i, d in enumerate(digits):
        grey = Image.fromarray((d * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BILINEAR)
        for fmt, ext in (("PNG", "png"), ("JPEG", "jpg")):
            buf = io.BytesIO()
            grey.convert("RGB").save(buf, format=fmt)
            out[f"digit{i}.{ext}"] = buf.getvalue()
    yy, xx = np.mgrid[0:40, 0:48]
    photo = np.stack([xx * 5, yy * 6, (xx + yy) * 3], axis=-1).clip(0, 255).astype(np.uint8)
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg"), ("GIF", "gif"), ("BMP", "bmp"), ("WEBP", "webp")):
        buf = io.BytesIO()
        Image.fromarray(photo).save(buf, format=fmt)
        out[f"photo.{ext}"] = buf.getvalue()
    return out


def _corrupt(data: bytes, how: str, rng: random.Random) -> bytes:
    if how == "truncate":
        return data[:rng.randrange(1, len(data))]
    if how == "flip":
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if how == "header":
        return bytes(rng.randrange(256) for _ in range(16)) + data[16:]
    if how == "empty":
        return b""
    if how == "garbage":
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 600)))
    if how == "tail":  # junk appended after a complete image
        return data + bytes(rng.randrange(256) for _ in range(64))
    return data  # "as is" (and "wrong extension": the bytes stay, the name lies)


def _fuzz_folder(root: Path) -> list[Path]:
    rng = random.Random(SEED)
    originals = _originals()
    kinds = ["truncate", "flip", "header", "empty", "garbage", "tail", "as is", "wrong extension"]
    files = []
    for n in range(48):
        name, data = rng.choice(sorted(originals.items()))
        how = kinds[n % len(kinds)]
        ext = rng.choice(["png", "jpg", "gif", "bmp"]) if how == "wrong extension" else name.rsplit(".", 1)[1]
        path = root / "ab"[n % 2] / f"{n:02d}-{how.replace(' ', '_')}-{name.rsplit('.', 1)[0]}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_corrupt(data, how, rng))
        files.append(path)
    return files


def test_every_corrupted_file_is_loaded_or_named(tmp_path):
    files = _fuzz_folder(tmp_path)
    splits = load_splits(tmp_path, workers=2)
    loaded = {i.source for i in splits.train + splits.eval}
    skipped = {s.path for s in splits.skipped}
    assert loaded | skipped == {str(f) for f in files} and not loaded & skipped  # nothing dropped silently
    assert len(skipped) >= 12  # every empty, garbage, header-damaged file at least
    assert all(s.reason for s in splits.skipped)
    for name in skipped:
        assert Path(name).name in splits.summary()
    # What the check let through really decodes in training, to a finite tensor of the right shape and range.
    ds = ImageDataset(splits.train + splits.eval, eval_transform(16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k in range(len(ds)):
            x, label = ds[k]
            assert x.shape == (3, 16, 16) and torch.isfinite(x).all() and x.abs().max() <= 1.0
    assert not ds._bad  # no file that passed the check failed later


def test_every_corrupted_sample_in_a_shard_is_yielded_or_named(tmp_path):
    files = _fuzz_folder(tmp_path / "files")
    usable = [f for f in files if f.stat().st_size > 0]  # the writer itself refuses empty image bytes
    with ShardWriter(tmp_path / "shards", ["a", "b"], max_count=16) as w:
        for i, f in enumerate(usable):
            w.write(f"s{i:02d}", f.read_bytes(), [i % 2], ext=f.suffix)
    ds = ShardDataset(tmp_path / "shards", lambda img, gen: eval_transform(16)(img, gen), shuffle_buffer=1)
    with pytest.warns(ShardWarning) as caught:
        yielded = [(x, t) for x, t in ds]
    named = [str(w.message) for w in caught if issubclass(w.category, ShardWarning)]
    assert len(yielded) + len(named) == len(usable)
    assert all("sample 's" in m and "skipped" in m for m in named)
    assert all(x.shape == (3, 16, 16) and torch.isfinite(x).all() and t.sum() == 1 for x, t in yielded)
