"""`evaluate fewshot` and `evaluate vtab`: end to end on tiny generated data, statistics checked against the runs."""

import csv
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bigtransfer.evaluation.protocol_runs
import bigtransfer.transfer.finetune
from bigtransfer.cli import main
from bigtransfer.data.datasets import load_splits
from bigtransfer.evaluation.protocol_runs import percent
from bigtransfer.transfer.finetune import run_finetune

from .test_finetune import make_image_folder

TINY = ["--model", "R14x0.5", "--steps", "2", "--batch", "4", "--resolution", "20", "16", "--workers", "0",
        "--base-lr", "0.3"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many tiny runs: on 2 shared cores, one torch thread is several times faster than two contending ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stats(results: dict) -> dict:
    return {k: {s: v[s] for s in ("median", "mean", "min", "max")} for k, v in results["shots"].items()}


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def settings_of(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())["settings"]


# ---------------------------------------------------------------- few-shot

@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("colours"), per_class=8, size=24)


@pytest.fixture(scope="module")
def sweep(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("fewshot") / "out"
    argv = ["evaluate", "fewshot", "--data", str(folder), "--shots", "2", "1", "--seeds", "2", "--out", str(out), *TINY]
    assert main(argv) == 0
    return out, argv


def test_fewshot_statistics_match_the_runs(sweep, folder):
    out, _ = sweep
    results = json.loads((out / "results.json").read_text())
    assert list(results["shots"]) == ["1", "2"] and results["seeds"] == 2
    held_out = load_splits(folder, seed=0, split_seed=0, check_images=False).eval
    for k in (1, 2):
        top1 = []
        for seed in (0, 1):
            run = out / f"k{k}" / f"seed{seed}"
            s, settings = summary_of(run), settings_of(run)
            assert settings["examples_per_class"] == k and settings["seed"] == seed and settings["split_seed"] == 0
            assert s["examples"] == 3 * k and s["eval_examples"] == len(held_out) == results["eval_examples"]
            top1.append(s["top1"])
        got = results["shots"][str(k)]
        # Two seeds: the median is the mean of the two; computed by hand, not with the module's helper.
        assert got["median"] == pytest.approx((top1[0] + top1[1]) / 2)
        assert got["mean"] == pytest.approx(sum(top1) / 2)
        assert (got["min"], got["max"]) == (min(top1), max(top1))
        assert [r["top1"] for r in got["runs"]] == top1
    md = (out / "results.md").read_text()
    for k in ("1", "2"):
        row = next(line for line in md.splitlines() if line.startswith(f"| {k} |"))
        assert f"{100 * results['shots'][k]['median']:.2f}" in row and f"{100 * results['shots'][k]['max']:.2f}" in row
    with Image.open(out / "accuracy_vs_shots.png") as img:
        assert img.format == "PNG" and img.size == (800, 500)
    config = json.loads((out / "config.json").read_text())
    assert config["shots"] == [1, 2] and config["train"]["model"] == "R14x0.5"


def test_fewshot_repeat_reuses_finished_runs_and_resumes_the_rest(sweep, monkeypatch, capsys):
    out, argv = sweep
    before = json.loads((out / "results.json").read_text())
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("k*/seed*/checkpoint.safetensors")}
    assert len(stamps) == 4

    def refuse(config):
        raise AssertionError(f"retrained {config.out}")

    monkeypatch.setattr(bigtransfer.evaluation.protocol_runs, "run_finetune", refuse)
    assert main(argv) == 0
    assert capsys.readouterr().out.count("reused") == 4
    after = json.loads((out / "results.json").read_text())
    assert stats(after) == stats(before) and after["runs_reused"] == 4
    assert after["train_time_s"] == pytest.approx(before["train_time_s"])  # the runs' own time, kept on reuse
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # A run without its summary (killed before the end) goes back to run_finetune, which resumes it; the others
    # are still reused.
    (out / "k2" / "seed1" / "summary.json").unlink()
    calls = []
    monkeypatch.setattr(bigtransfer.evaluation.protocol_runs, "run_finetune",
                        lambda config: calls.append(config.out) or run_finetune(config))
    assert main(argv) == 0
    assert calls == [str(out / "k2" / "seed1")]
    assert stats(json.loads((out / "results.json").read_text())) == stats(before)


def test_fewshot_errors_are_one_line(sweep, folder, tmp_path, capsys):
    out, argv = sweep
    # Other settings on top of finished runs: refused, naming the setting and the way out.
    assert main([*argv, "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "--steps was 2, now 3" in err and "--overwrite" in err and err.count("\n") == 1
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 2  # the record is left alone
    base = ["evaluate", "fewshot", "--data", str(folder), "--out", str(tmp_path / "o"), *TINY]
    assert main([*base, "--shots", "7"]) == 2  # 8 per class, 2 held out: 6 left
    err = capsys.readouterr().err
    assert "fewer than 7" in err and "blue (6)" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()  # nothing written before the data is known to fit
    assert main([*base, "--shots", "0"]) == 2
    assert "shots must be positive" in capsys.readouterr().err


# ---------------------------------------------------------------- VTAB-1k

def _images(folder: Path, classes: int, per_class: int, seed: int, size: int = 24) -> list[tuple[Path, int]]:
    """Real PNGs whose mean brightness encodes the class (learnable, and unchanged by flips and crops)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(classes):
        for i in range(per_class):
            a = rng.integers(0, 60, (size, size, 3)).astype(np.uint8) + np.uint8(60 * c)
            p = folder / str(c) / f"{seed}_{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(p)
            out.append((p, c))
    return out


SPLIT_SIZES = {"train800": 4, "val200": 2, "test": 3}  # per class


def _folder_task(task: Path, classes: int, splits=SPLIT_SIZES) -> None:
    for j, (split, n) in enumerate(splits.items()):
        _images(task / split, classes, n, seed=j)


def _manifest_task(task: Path, classes: int, suffix: str) -> None:
    for j, (split, n) in enumerate(SPLIT_SIZES.items()):
        rows = [(p.relative_to(task).as_posix(), c) for p, c in _images(task / "files" / split, classes, n, seed=j)]
        if suffix == ".csv":
            with open(task / f"{split}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["path", "label"])
                w.writerows(rows)
        else:
            (task / f"{split}.jsonl").write_text("".join(json.dumps({"path": p, "label": c}) + "\n" for p, c in rows))


@pytest.fixture(scope="module")
def vtab_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vtab")
    _folder_task(root / "dtd", 3)  # natural; train800val200 left out: the union of train800 and val200
    _manifest_task(root / "svhn", 2, ".jsonl")  # natural
    _manifest_task(root / "dsprites_location", 2, ".csv")  # structured; no flip, no crop
    _folder_task(root / "eurosat", 2, {"train800": 2, "val200": 1})  # specialized, but has no test split
    return root


@pytest.fixture(scope="module")
def vtab_run(vtab_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("vtab-out") / "out"
    transforms = []
    real = bigtransfer.transfer.finetune.train_transform
    mp = pytest.MonkeyPatch()
    # Record what each run asks for, where finetune looks train_transform up.
    mp.setattr(bigtransfer.transfer.finetune, "train_transform",
               lambda *a, **kw: transforms.append((a, kw)) or real(*a, **kw))
    argv = ["evaluate", "vtab", "--root", str(vtab_root), "--out", str(out), "--sweep", "--sweep-lr", "0.1", "0.3",
            "--seeds", "1", *TINY]
    try:
        assert main(argv) == 0
    finally:
        mp.undo()
    return out, argv, transforms


def test_vtab_runs_every_found_task_and_reports_the_missing(vtab_run, capsys):
    out, _, _ = vtab_run
    results = json.loads((out / "results.json").read_text())
    assert list(results["tasks"]) == ["dtd", "svhn", "dsprites-location"]
    missing = {m["task"]: m["reason"] for m in results["missing"]}
    assert "test" in missing["eurosat"] and "eurosat" in missing["eurosat"]
    assert len(missing) == 19 - 3
    md = (out / "results.md").read_text()
    assert "- eurosat:" in md and "| dsprites-location | structured | no | no |" in md
    with Image.open(out / "accuracy_per_task.png") as img:
        assert img.format == "PNG"


def test_vtab_splits_sweep_and_group_means(vtab_run):
    out, _, _ = vtab_run
    results = json.loads((out / "results.json").read_text())
    classes = {"dtd": 3, "svhn": 2, "dsprites-location": 2}
    scores = {}
    for name, n in classes.items():
        task = results["tasks"][name]
        sweep = []
        for lr in (0.1, 0.3):
            s = summary_of(out / name / "sweep" / f"lr{lr:g}-steps2")
            assert s["examples"] == 4 * n and s["eval_examples"] == 2 * n and s["eval_split"] == "val"
            sweep.append((s["top1"], lr))
        best = max(sweep, key=lambda t: t[0])[0]
        chosen = next(lr for top1, lr in sweep if top1 == best)  # ties: the first in grid order
        assert task["sweep"]["chosen"]["base_lr"] == chosen == task["base_lr"]
        final = out / name / "final" / "seed0"
        s = summary_of(final)
        assert settings_of(final)["base_lr"] == chosen
        assert s["examples"] == 6 * n and s["eval_examples"] == 3 * n and s["eval_split"] == "test"
        assert task["top1"] == s["top1"]
        scores[name] = s["top1"]
    natural = (scores["dtd"] + scores["svhn"]) / 2
    overall = (scores["dtd"] + scores["svhn"] + scores["dsprites-location"]) / 3
    assert results["groups"] == pytest.approx({"natural": natural, "structured": scores["dsprites-location"],
                                               "overall": overall})
    assert "specialized" not in results["groups"]
    md = (out / "results.md").read_text()
    assert f"| overall | 3 | {100 * overall:.2f} |" in md


def test_vtab_flip_and_crop_flags_reach_the_transform(vtab_run):
    out, _, transforms = vtab_run
    for name, flip, crop in (("dtd", True, True), ("dsprites-location", False, False)):
        for run in [*(out / name / "sweep").iterdir(), out / name / "final" / "seed0"]:
            settings = settings_of(run)
            assert (settings["flip"], settings["crop"]) == (flip, crop), run
    # 9 runs: 3 tasks x (2 sweep + 1 final); the dsprites ones asked for a transform without flip and crop.
    flags = [(kw.get("flip", True), kw.get("crop_ok", True)) for _, kw in transforms]
    assert len(flags) == 9 and flags.count((False, False)) == 3 and flags.count((True, True)) == 6


def test_vtab_repeat_reuses_runs(vtab_run, monkeypatch):
    out, argv, _ = vtab_run
    before = json.loads((out / "results.json").read_text())

    def refuse(config):
        raise AssertionError(f"retrained {config.out}")

    monkeypatch.setattr(bigtransfer.evaluation.protocol_runs, "run_finetune", refuse)
    assert main(argv) == 0
    after = json.loads((out / "results.json").read_text())
    assert after["runs_reused"] == 9 and after["groups"] == before["groups"]
    assert statistics.fmean(t["top1"] for t in after["tasks"].values()) == pytest.approx(after["groups"]["overall"])


def test_vtab_without_any_task_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "root").mkdir()
    assert main(["evaluate", "vtab", "--root", str(tmp_path / "root"), "--out", str(tmp_path / "o"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "none of the VTAB-1k tasks is usable" in err and err.count("\n") == 1


def test_vtab_runs_3_seeds_by_default_and_reports_their_median(vtab_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["evaluate", "vtab", "--root", str(vtab_root), "--out", str(out), "--tasks", "dtd", *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    task = results["tasks"]["dtd"]
    finals = [summary_of(out / "dtd" / "final" / f"seed{s}") for s in range(3)]
    assert sorted(p.name for p in (out / "dtd" / "final").iterdir()) == ["seed0", "seed1", "seed2"]
    assert [settings_of(out / "dtd" / "final" / f"seed{s}")["seed"] for s in range(3)] == [0, 1, 2]
    scores = [s["top1"] for s in finals]
    assert results["seeds"] == task["seeds"] == 3 and [r["top1"] for r in task["runs"]] == scores
    assert task["top1"] == statistics.median(scores) == results["groups"]["overall"]
    assert (task["top1_min"], task["top1_max"]) == (min(scores), max(scores))
    assert all(s["eval_split"] == "test" and s["eval_examples"] == 9 for s in finals)  # dtd: 3 classes x 3 test
    assert f"| {percent(statistics.median(scores))} |" in (out / "results.md").read_text()
    assert "median over 3 seeds" in (out / "results.md").read_text()


def test_tuned_trials_are_seeded_log_uniform_draws_from_the_appendix_space():
    from bigtransfer.evaluation.protocol_runs import TrainOptions
    from bigtransfer.evaluation.vtab import TUNED_MIXUP, TUNED_RESOLUTIONS, TUNED_STEPS, tuned_trial

    free = TrainOptions()
    draws = [tuned_trial("dtd", i, free) for i in range(2000)]
    lrs = [d["base_lr"] for d in draws]
    assert all(1e-4 <= v <= 1e-1 for v in lrs)
    # Log-uniform over three decades: a third of the draws in each decade, half below the geometric midpoint.
    for lo in (1e-4, 1e-3, 1e-2):
        assert sum(lo <= v < 10 * lo for v in lrs) / len(lrs) == pytest.approx(1 / 3, abs=0.04)
    assert sum(v < 10 ** -2.5 for v in lrs) / len(lrs) == pytest.approx(0.5, abs=0.04)
    assert {d["steps"] for d in draws} == set(TUNED_STEPS) and {d["mixup_alpha"] for d in draws} == set(TUNED_MIXUP)
    assert {d["resolution"] for d in draws} == {(r * 5 // 4, r) for r in TUNED_RESOLUTIONS}
    assert tuned_trial("dtd", 7, free) == draws[7] and tuned_trial("svhn", 7, free) != draws[7]
    # --steps / --resolution fix those settings and leave the other draws as they were.
    fixed = tuned_trial("dtd", 7, TrainOptions(steps=2, resolution=(20, 16)))
    assert fixed == {**draws[7], "steps": 2, "resolution": (20, 16)}


def test_vtab_tuned_picks_the_best_trial_on_val200_then_retrains_on_1000(vtab_root, tmp_path, monkeypatch):
    from bigtransfer.evaluation.vtab import tuned_trial

    out = tmp_path / "out"
    argv = ["evaluate", "vtab", "--root", str(vtab_root), "--out", str(out), "--tasks", "svhn", "--tuned",
            "--trials", "3", "--seeds", "1", *TINY]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    task = results["tasks"]["svhn"]
    assert results["tuned"] and results["trials"] == 3
    trials = []
    for i in range(3):
        run = out / "svhn" / "sweep" / f"trial{i:02d}"
        s, settings = summary_of(run), settings_of(run)
        drawn = tuned_trial("svhn", i, bigtransfer.evaluation.protocol_runs.TrainOptions(steps=2, resolution=(20, 16)))
        assert settings["base_lr"] == drawn["base_lr"] and settings["mixup_alpha"] == drawn["mixup_alpha"]
        assert settings["steps"] == 2 and settings["resolution"] == [20, 16]  # fixed by --steps / --resolution
        assert json.loads((run / "config.json").read_text())["plan"]["mixup_alpha"] == drawn["mixup_alpha"]
        assert s["examples"] == 4 * 2 and s["eval_examples"] == 2 * 2 and s["eval_split"] == "val"
        trials.append((s["top1"], i, drawn))
    best = max(trials, key=lambda t: (t[0], -t[1]))[2]  # ties: the first trial
    final = out / "svhn" / "final" / "seed0"
    assert settings_of(final)["base_lr"] == best["base_lr"] == task["base_lr"]
    assert settings_of(final)["mixup_alpha"] == best["mixup_alpha"]
    assert summary_of(final)["examples"] == 6 * 2 and summary_of(final)["eval_split"] == "test"
    assert task["top1"] == summary_of(final)["top1"]
    assert "Appendix A random search, 3 trials" in (out / "results.md").read_text()

    def refuse(config):
        raise AssertionError(f"retrained {config.out}")

    monkeypatch.setattr(bigtransfer.evaluation.protocol_runs, "run_finetune", refuse)
    assert main(argv) == 0  # resumable: every trial and the final run are reused
    assert json.loads((out / "results.json").read_text())["runs_reused"] == 4


def test_vtab_sweep_and_tuned_together_is_one_clear_line(vtab_root, tmp_path, capsys):
    argv = ["evaluate", "vtab", "--root", str(vtab_root), "--out", str(tmp_path / "o"), "--sweep", "--tuned", *TINY]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--sweep and --tuned" in err and err.count("\n") == 1
