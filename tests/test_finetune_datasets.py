"""run_finetune on torch Datasets given in Python: same run as the same images in a folder, safe resume, clear errors,
and on_step callbacks that receive the evaluations."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from bigtransfer.core.errors import UserError
from bigtransfer.engine.metrics import read_jsonl
from bigtransfer.transfer.finetune import FinetuneConfig, RunDirError, run_finetune

from .test_finetune import CLASSES, make_image_folder, weights


def tiny(data, out, **kw) -> FinetuneConfig:
    """test_finetune's tiny run, with `data` passed as it is (a path or a Dataset)."""
    settings = dict(model="R14x0.5", steps=4, batch=8, resolution=(36, 32), workers=0, silent=True, base_lr=0.3)
    return FinetuneConfig(data=data, out=str(out), **{**settings, **kw})


class Files(Dataset):
    """The images of a folder's class sub-folders, as a user would wrap them: (PIL image, label)."""

    def __init__(self, root: Path, as_tensor: bool = False) -> None:
        self.classes = list(CLASSES)
        self.files = [(p, c) for c, name in enumerate(CLASSES) for p in sorted((root / name).glob("*.png"))]
        self.as_tensor = as_tensor

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path, label = self.files[i]
        img = Image.open(path).convert("RGB")
        if self.as_tensor:  # torchvision's ToTensor: CHW float in [0, 1], and a 0-d tensor label
            return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0, torch.tensor(label)
        return img, label


class Items(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("split")
    make_image_folder(root / "train", per_class=6)
    make_image_folder(root / "val", per_class=2, seed=1)
    return root


def test_datasets_train_exactly_as_the_same_images_in_a_folder(split_folder, tmp_path):
    settings = dict(steps=3, batch=6, eval_every=2)
    from_folder = run_finetune(tiny(split_folder, tmp_path / "folder", **settings))
    seen = []
    from_data = run_finetune(tiny(Files(split_folder / "train"), tmp_path / "data", **settings),
                             on_step=lambda done, record: seen.append((done, record)),
                             val_data=Files(split_folder / "val", as_tensor=True))
    a, b = weights(Path(from_folder["checkpoint"])), weights(Path(from_data["checkpoint"]))
    for k in a:
        assert torch.equal(a[k], b[k]), k  # same examples, crops and flips step by step
    assert from_data["classes"] == list(CLASSES) and from_data["eval_examples"] == 6
    assert from_data["top1"] == from_folder["top1"] and from_data["eval_split"] == "val"
    saved = json.loads((tmp_path / "data" / "config.json").read_text())["settings"]["data"]
    assert saved == "torch Dataset Files (18 examples) + validation Dataset Files (6 examples)"
    # on_step: every step, and the evaluation of the steps that evaluated, as metrics.jsonl logged it.
    logged = {r["step"]: r["eval"] for r in read_jsonl(tmp_path / "data" / "metrics.jsonl") if "eval" in r}
    assert [d for d, _ in seen] == [1, 2, 3] and [d for d, r in seen if "eval" in r] == [2, 3]
    for done, record in seen:
        assert record["step"] == done and "loss" in record
        if "eval" in record:
            assert json.loads(json.dumps(record["eval"])) == logged[done]


def test_a_dataset_run_resumes_only_on_the_same_data(split_folder, tmp_path):
    data = Files(split_folder / "train")
    settings = dict(steps=2, batch=6, save_every=1)

    def stop_after_1(done, record):
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_finetune(tiny(data, tmp_path, **settings), on_step=stop_after_1)
    shorter = Files(split_folder / "train")
    shorter.files = shorter.files[1:]
    with pytest.raises(RunDirError, match=r"--data was 'torch Dataset Files \(18 examples\)', now .*17 examples"):
        run_finetune(tiny(shorter, tmp_path, **settings))
    relabelled = Files(split_folder / "train")
    relabelled.files = [(p, (c + 1) % 3) for p, c in relabelled.files]
    with pytest.raises(RunDirError, match=r"the data changed .*labels or classes in torch Dataset Files"):
        run_finetune(tiny(relabelled, tmp_path, **settings))
    summary = run_finetune(tiny(Files(split_folder / "train"), tmp_path, **settings))
    assert summary["steps"] == 2 and summary["examples"] == 15  # 20% of 18 held out per class: 3 of them


def test_bad_datasets_are_refused_before_training_naming_the_item(tmp_path, split_folder):
    good = torch.full((3, 8, 8), 0.5)
    cases = [
        (Items([("not an image", 0), (good, 1)]), r"train dataset item 0: expected .*got str"),
        (Items([(good * 3, 0), (good, 1)]), r"pixels in \[0, 1\].*from 1\.5 to 1\.5"),
        (Items([(good, 0), (good, -1)]), r"train dataset item 1: a label must be an int class index >= 0, got -1"),
        (Items([(good, 0), (good, 1.0)]), r"got 1\.0"),
        (Items([(torch.zeros(2, 8, 8), 0), (good, 1)]), r"CHW, HWC or HW with 1 or 3 channels, got shape \(2, 8, 8\)"),
        (Items([]), "the train Dataset is empty"),
        (Items([(good, 0), (good, 0)]), "1 class .*needs at least 2"),
    ]
    for data, message in cases:
        with pytest.raises(UserError, match=message):
            run_finetune(tiny(data, tmp_path / "run", steps=1))
    with pytest.raises(UserError, match="val_data goes with data given as a Dataset"):
        run_finetune(tiny(split_folder, tmp_path / "run", steps=1), val_data=Items([(good, 0)]))
    assert not (tmp_path / "run").exists()  # nothing written for a refused run
