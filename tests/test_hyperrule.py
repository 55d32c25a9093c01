"""BiT-HyperRule against values written out by hand from the spec (section 3), never computed by the code under test."""

import pytest

from bigtransfer.cli import main
from bigtransfer.transfer.hyperrule import lr_at, make_plan, mixup_alpha, resolution, schedule

SMALL = [100, 200, 300, 400, 500]
MEDIUM = [500, 3000, 6000, 9000, 10_000]
LARGE = [500, 6000, 12_000, 18_000, 20_000]


@pytest.mark.parametrize("n, expected, alpha", [
    (1, SMALL, 0.0), (19_999, SMALL, 0.0), (20_000, MEDIUM, 0.1), (20_001, MEDIUM, 0.1),
    (499_999, MEDIUM, 0.1), (500_000, LARGE, 0.1), (500_001, LARGE, 0.1), (14_197_122, LARGE, 0.1),
])
def test_release_schedule_and_mixup_by_dataset_size(n, expected, alpha):
    assert schedule(n) == expected
    assert mixup_alpha(n) == alpha


# (step, lr) for base 0.003: warmup base*s/warmup, then /10 per boundary strictly below s, None at the end.
SMALL_LR = [(0, 0.0), (1, 3e-5), (50, 0.0015), (99, 0.00297), (100, 0.003), (101, 0.003), (199, 0.003), (200, 0.003),
            (201, 3e-4), (300, 3e-4), (301, 3e-5), (399, 3e-5), (400, 3e-5), (401, 3e-6), (499, 3e-6), (500, None),
            (501, None), (10_000, None)]
MEDIUM_LR = [(0, 0.0), (1, 6e-6), (499, 0.002994), (500, 0.003), (3000, 0.003), (3001, 3e-4), (6000, 3e-4),
             (6001, 3e-5), (9000, 3e-5), (9001, 3e-6), (9999, 3e-6), (10_000, None)]
LARGE_LR = [(0, 0.0), (250, 0.0015), (499, 0.002994), (500, 0.003), (6000, 0.003), (6001, 3e-4), (12_000, 3e-4),
            (12_001, 3e-5), (18_000, 3e-5), (18_001, 3e-6), (19_999, 3e-6), (20_000, None)]


@pytest.mark.parametrize("n, table", [(1000, SMALL_LR), (19_999, SMALL_LR), (20_000, MEDIUM_LR),
                                      (499_999, MEDIUM_LR), (500_000, LARGE_LR), (1_281_167, LARGE_LR)])
def test_release_lr_value_for_value(n, table):
    plan = make_plan(n, (224, 224))
    for step, expected in table:
        got = lr_at(step, n)
        assert plan.lr(step) == got
        if expected is None:
            assert got is None, step
        else:
            assert got == pytest.approx(expected, rel=1e-12, abs=0), step


@pytest.mark.parametrize("size, expected", [
    ((95, 96), (160, 128)), ((96, 95), (160, 128)), ((96, 96), (512, 480)), ((1, 9215), (160, 128)),
    ((1, 9216), (512, 480)), ((47, 196), (160, 128)), ((48, 192), (512, 480)), ((32, 32), (160, 128)),
    ((500, 375), (512, 480)), ((8, 8), (160, 128)),
])
def test_release_resolution_by_image_area(size, expected):
    assert resolution(size) == expected
    assert make_plan(10, size).crop == expected[1]


@pytest.mark.parametrize("size, arch, expected", [
    ((96, 96), None, (448, 384)), ((224, 224), "R50x1", (448, 384)), ((224, 224), "BiT-M-R152x2", (448, 384)),
    ((224, 224), "R152x4", (512, 480)), ((224, 224), "BiT-S-R152x4", (512, 480)), ((95, 96), "R152x4", (160, 128)),
    ((32, 32), None, (160, 128)),
])
def test_paper_resolution(size, arch, expected):
    assert resolution(size, "paper", arch) == expected


@pytest.mark.parametrize("n, expected", [(500, [0, 150, 300, 450, 500]), (20_000, [0, 3000, 6000, 9000, 10_000]),
                                         (500_000, [0, 6000, 12_000, 18_000, 20_000])])
def test_paper_schedule(n, expected):
    assert schedule(n, "paper") == expected


def test_paper_lr_has_no_warmup_and_decays_at_30_60_90_percent():
    table = [(0, 0.003), (1, 0.003), (150, 0.003), (151, 3e-4), (300, 3e-4), (301, 3e-5), (450, 3e-5), (451, 3e-6),
             (499, 3e-6), (500, None)]
    for step, expected in table:
        got = lr_at(step, 100, variant="paper")
        assert got == (None if expected is None else pytest.approx(expected, rel=1e-12)), step


@pytest.mark.parametrize("batch, expected, peak", [
    (512, SMALL, 0.003),
    (256, [200, 400, 600, 800, 1000], 0.0015),
    (1024, [50, 100, 150, 200, 250], 0.006),
    (4096, [13, 25, 38, 50, 63], 0.024),                            # 12.5 -> 13, 37.5 -> 38, 62.5 -> 63 (half up)
    (8, [6400, 12_800, 19_200, 25_600, 32_000], 4.6875e-05),
    (3, [17_067, 34_133, 51_200, 68_267, 85_333], 1.7578125e-05),   # 512/3 = 170.67 steps per reference step
])
def test_batch_scaling(batch, expected, peak):
    assert schedule(100, batch=batch) == expected
    plan = make_plan(100, (32, 32), batch=batch)
    assert plan.peak_lr == pytest.approx(peak, rel=1e-12)
    warmup, d1 = expected[0], expected[1]
    assert lr_at(1, 100, batch=batch) == pytest.approx(peak / warmup, rel=1e-12)
    assert lr_at(d1, 100, batch=batch) == pytest.approx(peak, rel=1e-12)
    assert lr_at(d1 + 1, 100, batch=batch) == pytest.approx(peak / 10, rel=1e-12)
    assert lr_at(expected[-1], 100, batch=batch) is None
    assert plan.images_seen == expected[-1] * batch


def test_paper_batch_scaling_keeps_no_warmup():
    assert schedule(100, "paper", batch=256) == [0, 300, 600, 900, 1000]
    assert lr_at(0, 100, variant="paper", batch=256) == pytest.approx(0.0015)


@pytest.mark.parametrize("steps, expected", [
    (1000, [200, 400, 600, 800, 1000]), (50, [10, 20, 30, 40, 50]), (10, [2, 4, 6, 8, 10]), (5, [1, 2, 3, 4, 5]),
    (6, [1, 2, 4, 5, 6]),     # 1.2, 2.4, 3.6, 4.8 rounded half up
    (4, [1, 1, 2, 3, 4]),     # no room for four strictly increasing points below 4: warmup keeps its one step
    (2, [1, 1, 1, 1, 2]), (1, [1, 1, 1, 1, 1]),
])
def test_steps_override_moves_phases_proportionally(steps, expected):
    assert schedule(100, steps=steps) == expected
    assert schedule(100, steps=steps, batch=64) == expected  # --steps counts updates at the batch actually used


def test_steps_override_on_medium_and_paper():
    assert schedule(50_000, steps=1000) == [50, 300, 600, 900, 1000]
    assert schedule(100, "paper", steps=100) == [0, 30, 60, 90, 100]
    assert schedule(100, "paper", steps=4) == [0, 1, 2, 3, 4]
    plan = make_plan(100, (32, 32), batch=64, steps=100)
    assert (plan.warmup, plan.boundaries, plan.end) == (20, (40, 60, 80), 100)
    assert plan.lr(10) == pytest.approx(0.000375 * 10 / 20)
    assert plan.lr(99) == pytest.approx(0.000375e-3)


def test_plan_fields_and_phases():
    plan = make_plan(1000, (32, 32))
    assert (plan.precrop, plan.crop, plan.warmup, plan.boundaries, plan.end) == (160, 128, 100, (200, 300, 400), 500)
    assert (plan.batch, plan.base_lr, plan.mixup_alpha, plan.variant) == (512, 0.003, 0.0, "release")
    assert [(name, a, b) for name, a, b, _ in plan.phases()] == [
        ("warmup", 0, 99), ("constant", 100, 200), ("decay 1", 201, 300), ("decay 2", 301, 400), ("decay 3", 401, 499)]
    over = make_plan(1000, (32, 32), resolution_override=(40, 32))
    assert (over.precrop, over.crop) == (40, 32)


def test_bad_arguments_are_refused():
    for call in (lambda: schedule(0), lambda: schedule(10, batch=0), lambda: schedule(10, steps=0),
                 lambda: schedule(10, "tf"), lambda: resolution((0, 10)), lambda: lr_at(-1, 10),
                 lambda: make_plan(10, (32, 32), resolution_override=(32, 40)),
                 lambda: make_plan(10, (32, 32), base_lr=-1.0)):
        with pytest.raises(ValueError):
            call()


def test_cli_prints_the_plan(capsys):
    assert main(["hyperrule", "--examples", "1000", "--image-size", "32", "32"]) == 0
    out = capsys.readouterr().out
    assert "squash-resize to 160x160, random 128x128 crop" in out
    for line in ("warmup 0-99 100 linear 0 -> 0.00297", "constant 100-200 101 0.003", "decay 1 201-300 100 0.0003",
                 "decay 2 301-400 100 3e-05", "decay 3 401-499 99 3e-06"):
        assert line in " ".join(out.split()), line
    assert "mixup: alpha 0 (off" in out
    assert "500 steps x 512 = 256,000 images seen" in out
    assert "batch scaling" not in out


def test_cli_states_batch_scaling(capsys):
    assert main(["hyperrule", "--examples", "50000", "--image-size", "300", "400", "--batch", "128"]) == 0
    out = capsys.readouterr().out
    assert "squash-resize to 512x512, random 480x480 crop" in out
    assert "batch 128 instead of 512: lr x 128/512 (0.003 -> 0.00075), steps x 512/128" in out
    assert "constant 2000-12000 10001 0.00075" in " ".join(out.split())
    assert "alpha 0.1" in out and "40,000 steps x 128 = 5,120,000 images seen" in out


def test_cli_paper_variant_and_steps(capsys):
    assert main(["hyperrule", "--examples", "100", "--image-size", "224", "224", "--variant", "paper",
                 "--arch", "BiT-M-R152x4", "--steps", "100"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(paper)" in out and "512x512" in out and "480x480" in out
    assert "warmup" not in out.split("phase")[1]
    assert "constant 0-30 31 0.003" in out and "decay 3 91-99 9 3e-06" in out
    assert "100 steps set by --steps" in out


def test_cli_errors_are_one_line(capsys):
    assert main(["hyperrule", "--examples", "100"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--image-size" in err
    assert main(["hyperrule", "--examples", "0", "--image-size", "32", "32"]) == 2
    assert "n_examples must be a positive integer" in capsys.readouterr().err


def test_cli_reads_a_dataset(tmp_path, capsys):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.new("RGB", (20, 10), (i * 40, 0, 0)).save(tmp_path / c / f"{i}.png")
    assert main(["hyperrule", "--data", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "8 training examples in 2 classes, typical size 10x20" in out  # 1 of 5 per class held out
    assert "160x160" in out
