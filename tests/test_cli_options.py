"""Every setting declared once: the options each verb generates from its config's fields, `--resolution`'s one
meaning, `--quiet`, and a command line that starts without loading torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

import bigtransfer
from bigtransfer.cli import build_parser
from bigtransfer.cli.options import config_from
from bigtransfer.core.errors import UserError
from bigtransfer.corpus.config import CorpusConfig
from bigtransfer.evaluation.config import FewShotConfig, FrozenEvalConfig, TrainOptions, VtabConfig
from bigtransfer.transfer.config import DemoSettings, FinetuneConfig
from bigtransfer.upstream.config import PretrainConfig

# verb, the options it requires, the config the options build and that config's required values.
VERBS = [
    (["finetune"], ["--data", "d", "--out", "o", "--model", "R14x0.5"], FinetuneConfig,
     dict(data="d", out="o", model="R14x0.5")),
    (["pretrain"], ["--data", "d", "--out", "o", "--model", "R14x0.5"], PretrainConfig,
     dict(data="d", out="o", model="R14x0.5")),
    (["corpus"], ["--out", "o"], CorpusConfig, dict(out="o")),
    (["demo"], [], DemoSettings, {}),
    (["evaluate", "linear"], ["--data", "d", "--out", "o"], FrozenEvalConfig, dict(data="d", out="o", method="linear")),
    (["evaluate", "knn"], ["--data", "d", "--out", "o"], FrozenEvalConfig, dict(data="d", out="o", method="knn")),
    (["evaluate", "fewshot"], ["--data", "d", "--out", "o", "--model", "R14x0.5"], FewShotConfig,
     dict(data="d", out="o", train=TrainOptions(model="R14x0.5"))),
    (["evaluate", "vtab"], ["--root", "r", "--out", "o", "--model", "R14x0.5"], VtabConfig,
     dict(root="r", out="o", train=TrainOptions(model="R14x0.5"))),
]


def _parse(argv):
    return build_parser().parse_args(argv)


@pytest.mark.parametrize("verb,argv,config_class,required", VERBS, ids=[" ".join(v[0]) for v in VERBS])
def test_options_left_out_build_the_config_of_its_defaults(verb, argv, config_class, required):
    """Round trip: the options' defaults are the config's own, so parsing only what is required gives the config
    the library builds from the same required values."""
    args = _parse([*verb, *argv])
    explicit = {k: v for k, v in required.items() if k in ("method",)}
    if "train" in required:
        explicit["train"] = config_from(TrainOptions, args)
    assert config_from(config_class, args, **explicit) == config_class(**required)


def test_every_option_of_a_config_has_the_help_it_declares():
    for config_class in (FinetuneConfig, PretrainConfig, CorpusConfig, DemoSettings, FrozenEvalConfig, FewShotConfig,
                         VtabConfig):
        for f in dataclasses.fields(config_class):
            assert f.metadata.get("help"), f"{config_class.__name__}.{f.name} has no help text"
    text = build_parser()._subparsers._group_actions[0].choices["finetune"].format_help()
    assert "squash-resize to PRECROP" in text and "(default 512)" in text and "--no-flip" in text


def test_values_given_reach_the_config():
    args = _parse(["finetune", "--data", "d", "--out", "o", "--model", "m", "--no-flip", "--batch", "8",
                   "--base-lr", "0.5", "--precision", "bf16"])
    c = config_from(FinetuneConfig, args)
    assert (c.flip, c.batch, c.base_lr, c.precision, c.crop) == (False, 8, 0.5, "bf16", True)
    c = config_from(PretrainConfig, _parse(["pretrain", "--data", "d", "--out", "o", "--model", "m",
                                            "--no-decay-norm-bias", "--epochs", "2.5"]))
    assert (c.decay_norm_and_bias, c.epochs) == (False, 2.5)
    c = config_from(CorpusConfig, _parse(["corpus", "--out", "o", "--sources", "glyphs, emoji", "--format", "png",
                                          "--fonts", "a", "--fonts", "b"]))
    assert (c.sources, c.image_format, c.font_dirs, c.icon_themes) == (["glyphs", "emoji"], "png", ["a", "b"],
                                                                        CorpusConfig(out="o").icon_themes)
    c = config_from(VtabConfig, _parse(["evaluate", "vtab", "--root", "r", "--out", "o", "--model", "m",
                                        "--sweep-lr", "0.1", "0.2", "--tasks", "dtd"]), train=TrainOptions())
    assert (c.sweep_lrs, c.tasks) == ((0.1, 0.2), ["dtd"])


@pytest.mark.parametrize("verb,numbers,expected", [
    (["finetune", "--data", "d", "--out", "o", "--model", "m"], ["36", "32"], (36, 32)),
    (["finetune", "--data", "d", "--out", "o", "--model", "m"], ["40"], (40, 40)),
    (["evaluate", "fewshot", "--data", "d", "--out", "o", "--model", "m"], ["40"], (40, 40)),
    (["pretrain", "--data", "d", "--out", "o", "--model", "m"], ["64"], 64),
    (["pretrain", "--data", "d", "--out", "o", "--model", "m"], ["64", "64"], 64),
    (["evaluate", "linear", "--data", "d", "--out", "o"], ["48"], 48),
    (["evaluate", "knn", "--data", "d", "--out", "o"], ["48", "48"], 48),
])
def test_resolution_takes_one_or_two_numbers_with_one_meaning(verb, numbers, expected):
    args = _parse([*verb, "--resolution", *numbers])
    config_class = {"finetune": FinetuneConfig, "pretrain": PretrainConfig}.get(verb[0])
    if verb[0] == "evaluate":
        config_class = FewShotConfig if verb[1] == "fewshot" else FrozenEvalConfig
    if config_class is FewShotConfig:
        assert config_from(TrainOptions, args).resolution == expected
    else:
        assert config_from(config_class, args, **({"method": "knn"} if config_class is FrozenEvalConfig else {})
                           ).resolution == expected


def test_resolution_refuses_what_has_no_meaning():
    args = _parse(["finetune", "--data", "d", "--out", "o", "--model", "m", "--resolution", "1", "2", "3"])
    with pytest.raises(UserError, match="one or two numbers"):
        config_from(FinetuneConfig, args)
    args = _parse(["pretrain", "--data", "d", "--out", "o", "--model", "m", "--resolution", "64", "48"])
    with pytest.raises(UserError, match="takes no PRECROP"):
        config_from(PretrainConfig, args)


def test_quiet_is_the_one_flag_and_no_progress_its_hidden_alias():
    for argv in (["finetune", "--data", "d", "--out", "o", "--model", "m"], ["pretrain", "--data", "d", "--out", "o",
                 "--model", "m"], ["demo"], ["embed", "x", "--out", "f.npy"]):
        assert _parse([*argv, "--quiet"]).quiet is True and _parse(argv).quiet is False
    assert _parse(["embed", "x", "--out", "f.npy", "--no-progress"]).quiet is True
    assert "--no-progress" not in build_parser()._subparsers._group_actions[0].choices["embed"].format_help()


def test_the_command_line_starts_without_torch():
    """Building every verb's parser (what `bigtransfer --help` does) loads neither torch nor numpy."""
    code = ("import sys; from bigtransfer.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_public_api_loads_on_first_use():
    from bigtransfer import create_model, prepare_for_inference  # noqa: F401 - the import is the test

    for name in bigtransfer.__all__:
        assert getattr(bigtransfer, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bigtransfer.nope  # noqa: B018
    assert bigtransfer.FinetuneConfig is FinetuneConfig
