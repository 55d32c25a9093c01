"""What a run tells its user and leaves behind: chance level, top-5 only where it means something, a wall-time
estimate, how to go on after Ctrl-C, state.pt removed after a finished run, and evaluate's folder guard."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bigtransfer import create_model, save_checkpoint
from bigtransfer.cli import main
from bigtransfer.transfer.finetune import RunDirError, run_finetune, scores, time_estimate

from .test_finetune import make_image_folder, tiny


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("colours"), per_class=6)


def test_scores_give_chance_and_top5_only_above_5_classes():
    assert scores(0.5, 1.0, 3) == "top-1 0.5000 (chance 0.3333)"
    assert scores(0.5, 1.0, 5) == "top-1 0.5000 (chance 0.2000)"
    assert scores(0.25, 0.75, 8) == "top-1 0.2500 (chance 0.1250), top-5 0.7500"


def test_time_estimate_by_hand():
    # 2 s a step x 1000 steps + 5 evaluations x 10 s = 2050 s: 34 minutes, no warning.
    line = time_estimate(2.0, 1000, 10.0, 5, "cpu (2 threads)")
    assert line == ("estimated time to the end: about 34 min (2 s per step on cpu (2 threads); 1000 steps and 5 "
                    "evaluations to go)")
    # The README's CPU default: 500 steps of 512 images at 128 px, ~12 s a step here: 1.7 hours, with a warning.
    line = time_estimate(12.0, 500, 30.0, 5, "cpu (2 threads)")
    assert line.startswith("WARNING: estimated time to the end: about 1.7 hours") and "a GPU would shorten it" in line
    assert time_estimate(0.5, 1, 0.1, 1, "cpu").startswith("estimated time to the end: about 1 s (0.5 s per step on "
                                                          "cpu; 1 step and 1 evaluation to go)")


def test_a_finished_run_drops_its_state_and_is_not_retrained(folder, tmp_path, capsys):
    steps = []
    first = run_finetune(tiny(folder, tmp_path, steps=5, batch=4, eval_every=5, silent=False, quiet=True),
                         on_step=lambda done, record: steps.append(done))
    out = capsys.readouterr().out
    assert steps == [1, 2, 3, 4, 5]
    # After step 4 (the first is not timed, then 3 are): one estimate, for the 1 step and 1 evaluation left.
    assert out.count("estimated time to the end: about") == 1 and "1 step and 1 evaluation to go" in out
    assert "(chance 0.3333)" in out and "top-5" not in out  # 3 classes: top-5 is always 1
    assert first["top5"] is None and first["chance_top1"] == pytest.approx(1 / 3)
    assert not (tmp_path / "state.pt").exists() and (tmp_path / "checkpoint.safetensors").is_file()
    stamp = (tmp_path / "checkpoint.safetensors").stat().st_mtime_ns

    again = run_finetune(tiny(folder, tmp_path, steps=5, batch=4, eval_every=5, silent=False, quiet=True),
                         on_step=lambda done, record: steps.append(done))
    assert again == first and steps == [1, 2, 3, 4, 5]  # not one step trained again
    assert "this run already finished (5 steps)" in capsys.readouterr().out
    assert (tmp_path / "checkpoint.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(RunDirError, match="--steps was 5, now 6"):
        run_finetune(tiny(folder, tmp_path, steps=6, batch=4, eval_every=5))
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "red" / "new.png")
    try:
        with pytest.raises(RunDirError, match="the data changed since this run started"):
            run_finetune(tiny(folder, tmp_path, steps=5, batch=4, eval_every=5))
    finally:
        (folder / "red" / "new.png").unlink()

    kept = run_finetune(tiny(folder, tmp_path / "kept", steps=1, batch=4, keep_state=True))
    assert kept["steps"] == 1 and (tmp_path / "kept" / "state.pt").is_file()


def test_ctrl_c_before_the_first_saved_state_says_the_command_starts_again(folder, tmp_path, capsys):
    def ctrl_c(done, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_finetune(tiny(folder, tmp_path, steps=4, batch=4, save_every=3), on_step=ctrl_c)
    assert (f"interrupted before any state was saved in {tmp_path}: the same command starts the run again"
            in capsys.readouterr().err)


def test_evaluate_refuses_a_results_folder_of_other_settings(folder, tmp_path, capsys):
    weights = save_checkpoint(create_model("R14x0.5", num_classes=3), tmp_path / "m.safetensors")
    common = ["--data", str(folder), "--weights", str(weights), "--resolution", "32", "--no-cache", "--workers", "0",
              "--out", str(tmp_path / "knn")]
    assert main(["evaluate", "knn", *common, "--k", "3"]) == 0
    before = (tmp_path / "knn" / "results.json").read_text()
    assert main(["evaluate", "knn", *common, "--k", "5"]) == 2
    err = capsys.readouterr().err
    assert "holds results made with other settings (--k was 3, now 5)" in err and "--overwrite" in err
    assert (tmp_path / "knn" / "results.json").read_text() == before  # untouched
    assert main(["evaluate", "knn", *common, "--k", "3"]) == 0  # the same settings again: fine
    assert main(["evaluate", "knn", *common, "--k", "5", "--overwrite"]) == 0
    assert json.loads((tmp_path / "knn" / "results.json").read_text())["k"] == 5
