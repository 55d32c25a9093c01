"""Tar shards: write/read round trip, index.json, splitting over ranks and workers, the streaming dataset."""

from __future__ import annotations

import io
import json
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from bigtransfer.data.images import squash, to_tensor
from bigtransfer.data.shards import (
    ShardDataset,
    ShardError,
    ShardWarning,
    ShardWriter,
    iter_shard,
    read_index,
    split_shards,
)

CLASSES = ["cat", "dog", "animal", "pet", "red", "blue"]


def png(i: int, size: int = 12) -> bytes:
    """A real PNG whose top-left pixel encodes i (so a decoded view can be traced back to its sample)."""
    rng = np.random.default_rng(i)
    a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    a[0, 0] = (i, 255 - i, 7)
    buf = io.BytesIO()
    Image.fromarray(a, "RGB").save(buf, "PNG")
    return buf.getvalue()


def labels_of(i: int) -> list[int]:
    """Multi-label targets that vary with i: 1 to 3 labels."""
    return sorted({i % 2, 2 + (i % 3 == 0), 4 + (i % 2)})[: 1 + i % 3]


def write_set(root, n: int = 7, max_count: int = 3, ext: str = "png") -> list[tuple[str, bytes, list[int]]]:
    samples = [(f"s{i:03d}", png(i), labels_of(i)) for i in range(n)]
    with ShardWriter(root, CLASSES, prefix="part", max_count=max_count, info={"note": "test"}) as w:
        for key, data, labels in samples:
            w.write(key, data, labels, ext=ext, meta={"i": int(key[1:])})
    return samples


def test_round_trip_keys_bytes_labels_and_index(tmp_path):
    samples = write_set(tmp_path / "set", n=7, max_count=3)
    raw = json.loads((tmp_path / "set" / "index.json").read_text())
    assert raw["classes"] == CLASSES and raw["multi_label"] is True and raw["num_samples"] == 7
    assert [(s["name"], s["count"]) for s in raw["shards"]] == [("part-000000.tar", 3), ("part-000001.tar", 3),
                                                                 ("part-000002.tar", 1)]
    index = read_index(tmp_path / "set")
    assert index.num_samples == 7 and index.info == {"note": "test"} and index.classes == CLASSES
    got = [s for p in index.paths() for s in iter_shard(p)]
    assert got == samples  # same keys, identical bytes, same (multi-)labels, in write order
    assert any(len(labels) > 1 for _, _, labels in got)
    # A plain tar reader sees <key>.png + <key>.json, adjacent, with the meta kept beside the labels.
    with tarfile.open(tmp_path / "set" / "part-000000.tar") as tar:
        names = tar.getnames()
        assert names[:4] == ["s000.png", "s000.json", "s001.png", "s001.json"]
        assert json.loads(tar.extractfile("s001.json").read()) == {"labels": labels_of(1), "i": 1}
    assert not list((tmp_path / "set").glob(".*"))  # no temporary files left behind


def test_writer_output_is_byte_identical_for_the_same_input(tmp_path):
    write_set(tmp_path / "a")
    write_set(tmp_path / "b")
    for name in ("part-000000.tar", "part-000002.tar", "index.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("key, labels, ext, message", [
    ("a.b", [0], "png", "may only hold"),
    ("ok", [6], "png", "must be distinct class indices"),
    ("ok", [1, 1], "png", "must be distinct class indices"),
    ("ok", [], "png", "must be distinct class indices"),
    ("ok", [0], "txt", "not an image format"),
])
def test_writer_rejects_bad_samples(tmp_path, key, labels, ext, message):
    with ShardWriter(tmp_path, CLASSES) as w, pytest.raises(ShardError, match=message):
        w.write(key, png(0), labels, ext=ext)


def test_writer_rejects_duplicates_single_label_and_reuse(tmp_path):
    with ShardWriter(tmp_path / "m", CLASSES, multi_label=False) as w:
        w.write("x", png(0), [1])
        with pytest.raises(ShardError, match="duplicate sample key 'x'"):
            w.write("x", png(1), [1])
        with pytest.raises(ShardError, match="exactly one label"):
            w.write("y", png(1), [1, 2])
    assert read_index(tmp_path / "m").multi_label is False
    with pytest.raises(ShardError, match="already holds a shard set"):
        ShardWriter(tmp_path / "m", CLASSES)


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    root = tmp_path / "set"
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(root, CLASSES, max_count=2) as w:
        for i in range(5):
            w.write(f"k{i}", png(i), [0])
        raise RuntimeError("boom")
    assert list(root.iterdir()) == []  # finished shards, the shard in progress and index.json: all gone
    with pytest.raises(ShardError, match="no index.json"):
        read_index(root)


def test_read_index_names_the_folder_and_the_problem(tmp_path):
    with pytest.raises(ShardError, match="no such folder"):
        read_index(tmp_path / "missing")
    write_set(tmp_path / "c" / "train")
    with pytest.raises(ShardError, match=r"no index.json .*did you mean .*train"):
        read_index(tmp_path / "c")
    (tmp_path / "c" / "train" / "part-000001.tar").unlink()
    with pytest.raises(ShardError, match="part-000001.tar.*missing"):
        read_index(tmp_path / "c" / "train")
    (tmp_path / "c" / "train" / "index.json").write_text("{not json")
    with pytest.raises(ShardError, match=r"index.json: corrupt index"):
        read_index(tmp_path / "c" / "train")


def test_split_shards_is_disjoint_covering_and_deterministic():
    shards = [f"s{i}" for i in range(11)]
    parts = {(r, w): split_shards(shards, r, 2, w, 2) for r in range(2) for w in range(2)}
    flat = [s for p in parts.values() for s in p]
    assert sorted(flat) == sorted(shards) and len(flat) == len(set(flat))
    assert parts == {(r, w): split_shards(shards, r, 2, w, 2) for r in range(2) for w in range(2)}
    assert sorted(len(p) for p in parts.values()) == [2, 3, 3, 3]
    with pytest.raises(ValueError, match="rank 2"):
        split_shards(shards, 2, 2, 0, 1)
    with pytest.raises(ValueError, match="worker 3"):
        split_shards(shards, 0, 1, 3, 2)


def crop_transform(img, gen: torch.Generator) -> torch.Tensor:
    """A random 8x8 crop drawn from the generator it is given (as a training transform would)."""
    x = to_tensor(squash(img, 12))
    i, j = (int(v) for v in torch.randint(0, 5, (2,), generator=gen))
    return x[:, i:i + 8, j:j + 8]


def sample_id(x: torch.Tensor, target: torch.Tensor) -> tuple:
    return (tuple(target.tolist()), x.numpy().tobytes())


def collect(root, epoch=0, rank=0, world=1, workers=0, seed=3) -> list[tuple]:
    ds = ShardDataset(root, crop_transform, seed=seed, rank=rank, world_size=world, shuffle_buffer=4)
    ds.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    return [sample_id(x, t) for x, t in loader]


def test_dataset_shapes_targets_and_determinism(tmp_path):
    samples = write_set(tmp_path / "set", n=20, max_count=3)
    ds = ShardDataset(tmp_path / "set", crop_transform, seed=3)
    seen = list(ds)
    assert len(seen) == 20
    for x, target in seen:
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
        assert target.shape == (len(CLASSES),) and target.dtype == torch.float32
    # Targets are the multi-hot form of each sample's labels (the whole multiset matches).
    expected = sorted(tuple(float(c in labels) for c in range(len(CLASSES))) for _, _, labels in samples)
    assert sorted(tuple(t.tolist()) for _, t in seen) == expected
    first = collect(tmp_path / "set", epoch=0)
    assert first == collect(tmp_path / "set", epoch=0)  # same seed and epoch: same order, same views
    other = collect(tmp_path / "set", epoch=1)
    assert other != first and sorted(t for t, _ in other) == sorted(t for t, _ in first)


def test_two_ranks_times_two_workers_read_every_sample_once_with_the_same_views(tmp_path):
    write_set(tmp_path / "set", n=21, max_count=2)  # 11 shards
    alone = collect(tmp_path / "set")
    split = [s for r in range(2) for s in collect(tmp_path / "set", rank=r, world=2, workers=2)]
    assert len(split) == 21
    # The same samples, each once, and each view identical: augmentation is keyed by the sample, not the reader.
    assert sorted(split) == sorted(alone)


def write_raw_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_members_are_named_and_skipped(tmp_path):
    root = tmp_path / "set"
    write_set(root, n=6, max_count=6)  # part-000000.tar (6 samples), replaced by a hand-made one with bad ones
    shard = root / "part-000000.tar"
    good = json.dumps({"labels": [1, 3]}).encode()
    write_raw_tar(shard, [
        ("a.png", png(1)), ("a.json", good),
        ("b.png", png(2)), ("b.json", b"{broken"),  # corrupt JSON
        ("c.png", png(3)),  # no JSON at all
        ("d.png", b"\x89PNG not really"), ("d.json", good),  # image bytes that do not decode
        ("e.json", good),  # no image
        ("f.jpg", png(4)), ("f.json", good),  # mislabelled suffix, still a real image
    ])
    with pytest.warns(ShardWarning) as caught:
        got = list(iter_shard(shard))
    assert [k for k, _, _ in got] == ["a", "d", "f"]
    messages = " | ".join(str(w.message) for w in caught)
    for key, problem in (("b", "corrupt b.json"), ("c", "no .json member"), ("e", "no image member")):
        assert f"part-000000.tar: sample '{key}': {problem}" in messages
    with pytest.warns(ShardWarning) as caught:
        out = list(ShardDataset(root, crop_transform))
    assert any(re.search(r"part-000000.tar: sample 'd'.*(not an image|cannot decode)", str(w.message)) for w in caught)
    assert len(out) == 2 and all(t.tolist() == [0, 1, 0, 1, 0, 0] for _, t in out)


def test_a_truncated_shard_yields_what_precedes_the_damage(tmp_path):
    write_set(tmp_path / "set", n=6, max_count=6)
    shard = tmp_path / "set" / "part-000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:5000])  # cut inside a member
    with pytest.warns(ShardWarning, match=r"part-000000.tar: unreadable after \d samples"):
        got = list(iter_shard(shard))
    assert 1 <= len(got) < 6 and [k for k, _, _ in got] == [f"s{i:03d}" for i in range(len(got))]
    # Cut at a member boundary, a tar looks complete; only the count in index.json tells.
    cut = next(n for n in range(512, len(data), 512) if data[n:n + 4] == b"s003")
    shard.write_bytes(data[:cut])
    assert len(list(iter_shard(shard))) == 3
    with pytest.warns(ShardWarning, match=r"part-000000.tar: holds 3 samples but index.json says 6"):
        assert len(list(ShardDataset(tmp_path / "set", crop_transform))) == 3
