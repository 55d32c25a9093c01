"""The VTAB-1k task table against the spec, and the ROOT/<task>/<split> reader on a miniature VTAB."""

import csv

import pytest
from PIL import Image

from bigtransfer.evaluation.vtab_tasks import GROUPS, SPLITS, TASKS, get_task, group_means, read_vtab

# Spec section 5, verbatim.
SPEC_GROUPS = {
    "natural": ["caltech101", "cifar100", "dtd", "oxford_flowers102", "oxford_iiit_pet", "sun397", "svhn"],
    "specialized": ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"],
    "structured": ["clevr-count", "clevr-distance", "dmlab", "kitti-distance", "dsprites-location",
                   "dsprites-orientation", "smallnorb-azimuth", "smallnorb-elevation"],
}
SPEC_NO_FLIP = {"dsprites-orientation", "smallnorb-azimuth", "dsprites-location"}
SPEC_NO_CROP = {"clevr-count", "clevr-distance", "dmlab", "kitti-distance", "dsprites-location"}


def test_table_has_the_19_tasks_with_the_spec_groups_and_flags():
    assert len(TASKS) == 19 and len({t.name for t in TASKS}) == 19
    assert {g: [t.name for t in TASKS if t.group == g] for g in GROUPS} == SPEC_GROUPS
    assert {t.name for t in TASKS if not t.flip} == SPEC_NO_FLIP
    assert {t.name for t in TASKS if not t.crop} == SPEC_NO_CROP


def test_label_counts_of_well_known_datasets():
    known = {"cifar100": 100, "svhn": 10, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
             "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5}
    assert {n: get_task(n).num_classes for n in known} == known
    assert all(t.num_classes >= 2 for t in TASKS)


def test_get_task_accepts_either_separator_and_rejects_unknown_names():
    assert get_task("clevr_count") is get_task("clevr-count")
    with pytest.raises(ValueError, match="unknown VTAB task 'imagenet'"):
        get_task("imagenet")


def _images(folder, per_class, prefix="x"):
    for label, n in per_class.items():
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (6, 6), (i * 20, 0, 0)).save(folder / label / f"{prefix}{i}.png")


def _manifest(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)


@pytest.fixture()
def mini_vtab(tmp_path):
    """dtd (folders), clevr_count (CSV manifests, integer labels), eurosat (no train800val200), svhn (no test)."""
    root = tmp_path / "vtab"
    for split, n in (("train800", 2), ("val200", 1), ("train800val200", 3), ("test", 2)):
        _images(root / "dtd" / split, {"banded": n, "woven": n}, prefix=split)
    img = root / "clevr_count" / "img"
    img.mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (6, 6)).save(img / f"{i}.png")
    _manifest(root / "clevr_count" / "train800.csv", [("img/0.png", 3), ("img/1.png", 5)])
    _manifest(root / "clevr_count" / "val200.csv", [("img/2.png", 3)])
    _manifest(root / "clevr_count" / "train800val200.csv", [("img/0.png", 3), ("img/1.png", 5), ("img/2.png", 3)])
    _manifest(root / "clevr_count" / "test.csv", [("img/3.png", 7), ("img/4.png", 0)])
    for split in ("train800", "val200", "test"):
        _images(root / "eurosat" / split, {"Forest": 1, "River": 1}, prefix=split)
    _images(root / "svhn" / "train800val200", {"0": 1})
    (root / "my_notes").mkdir()
    return root


def test_reader_reads_the_miniature_vtab_and_reports_missing_tasks(mini_vtab):
    data = read_vtab(mini_vtab)
    found = {t.task.name: t for t in data.tasks}
    assert sorted(found) == ["clevr-count", "dtd", "eurosat"]
    missing = dict(data.missing)
    assert len(missing) == 16 and "svhn" in missing and "caltech101" in missing
    assert "no train800, val200, test" in missing["svhn"]
    assert "no folder" in missing["caltech101"]
    assert data.unknown == ["my_notes"]

    dtd = found["dtd"]
    assert dtd.classes == ["banded", "woven"]
    assert {s: len(dtd.splits[s]) for s in SPLITS} == {"train800": 4, "val200": 2, "train800val200": 6, "test": 4}
    assert all(dtd.classes[i.label] in i.source for s in SPLITS for i in dtd.splits[s])

    clevr = found["clevr-count"]
    assert clevr.folder.name == "clevr_count" and clevr.task.crop is False
    assert clevr.classes == [str(i) for i in range(8)]  # integer labels keep their ids; 8 classes in the table
    assert [(i.source.rsplit("/", 1)[-1], i.label) for i in clevr.splits["test"]] == [("3.png", 7), ("4.png", 0)]
    assert clevr.sources["test"].endswith("test.csv")

    euro = found["eurosat"]
    assert euro.sources["train800val200"] == "train800 + val200"
    assert sorted(i.source for i in euro.splits["train800val200"]) == sorted(
        i.source for i in euro.splits["train800"] + euro.splits["val200"])
    assert any("VTAB-1k uses 800" in n for n in euro.notes)  # sizes other than 800/200/1000 are noted

    text = data.report()
    assert "3 of 19 tasks found" in text and "missing svhn" in text and "my_notes" in text


def test_reader_selects_tasks_and_refuses_a_missing_root(mini_vtab, tmp_path):
    data = read_vtab(mini_vtab, tasks=["dtd", "smallnorb_azimuth"])
    assert [t.task.name for t in data.tasks] == ["dtd"] and [m for m, _ in data.missing] == ["smallnorb-azimuth"]
    with pytest.raises(FileNotFoundError, match="no such folder"):
        read_vtab(tmp_path / "nowhere")


def test_reader_reports_a_task_with_more_classes_than_the_table(tmp_path):
    for split in SPLITS:
        _images(tmp_path / "patch_camelyon" / split, {"a": 1, "b": 1, "c": 1})
    data = read_vtab(tmp_path, tasks=["patch_camelyon"])
    assert data.tasks == [] and "3 classes, but patch_camelyon has 2" in data.missing[0][1]


def test_group_means_by_hand():
    scores = {"dtd": 0.5, "svhn": 0.7, "eurosat": 0.9, "dmlab": 0.2}
    means = group_means(scores)
    assert means["natural"] == pytest.approx(0.6) and means["specialized"] == pytest.approx(0.9)
    assert means["structured"] == pytest.approx(0.2) and means["overall"] == pytest.approx(0.575)
