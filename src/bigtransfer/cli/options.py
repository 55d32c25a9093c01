"""What the verbs share: a run config built from the parsed options, the defaults taken from the config itself.

A verb registers its options without defaults and then calls `use_defaults(parser, Config)`: the dataclass's
defaults become the options' (and `%(default)s` in a help text shows them), so each default is written once.
`config_from(Config, args)` copies every option that names a field; `explicit` gives the ones that need converting.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def use_defaults(parser: argparse.ArgumentParser, config_class: type) -> None:
    """Make every default of `config_class` the default of the option of the same name."""
    parser.set_defaults(**{f.name: f.default for f in dataclasses.fields(config_class)
                           if f.default is not dataclasses.MISSING})


def config_from(config_class: type[T], args: argparse.Namespace, **explicit: Any) -> T:
    """A `config_class` from the options that name its fields, and `explicit` values for the others."""
    given = vars(args)
    values = {f.name: given[f.name] for f in dataclasses.fields(config_class) if f.name in given}
    return config_class(**{**values, **explicit})
