"""How a run setting is declared once: a dataclass field carrying its default and its help text.

`setting(default, "help text", **cli)` is `dataclasses.field` with the help (an argparse help string: `%(default)s`
shows the default, `%%` is a percent sign) and the command-line details in its metadata; `bigtransfer.cli.options`
builds each verb's options from these fields, so a default or a help text is written in one place only.

Command-line details (all optional): flag (e.g. "--no-flip" for a switch that is on by default), metavar, choices,
nargs, required (an option the command line requires though the library has a default), cli=False (not an option:
set by the library or another verb), kind: "resolution" (`--resolution [PRECROP] CROP`, one meaning in every verb:
see `bigtransfer.cli.options`), "csv" (a comma-separated word list) or "append" (a repeatable option).
"""

from __future__ import annotations

import dataclasses
from typing import Any

CLI_KEYS = ("flag", "metavar", "choices", "nargs", "required", "cli", "kind")


def setting(default: Any = dataclasses.MISSING, help: str = "", *,  # noqa: A002 - argparse's word
            default_factory: Any = dataclasses.MISSING, **cli: Any) -> Any:
    """A dataclass field with its help text and command-line details in its metadata (see the module doc)."""
    unknown = set(cli) - set(CLI_KEYS)
    if unknown:
        raise TypeError(f"unknown command-line detail(s) {sorted(unknown)}; known: {', '.join(CLI_KEYS)}")
    if not help:
        raise TypeError("every setting needs a help text")
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help, **cli})


def help_of(config_class: type, name: str) -> str:
    """The help text a setting was declared with."""
    return next(f.metadata["help"] for f in dataclasses.fields(config_class) if f.name == name)
