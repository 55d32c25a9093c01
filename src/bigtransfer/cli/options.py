"""Each verb's options, generated from the settings its run config declares (`core.settings.setting`).

`add_options(parser, Config)` adds one option per field of Config: its flag, type, default and help text all come
from the field, so a default or a help text is written once, in the config. Switches: a bool field that is off
by default becomes `--name`; one that is on by default becomes the flag its declaration names (e.g. `--no-flip`).
`config_from(Config, args, **explicit)` builds the config back from the parsed options.

`--resolution` means the same in every verb: `--resolution CROP` or `--resolution PRECROP CROP`. CROP is the side
the model sees (training crops, evaluation, inference). PRECROP is the side training images are squashed to before
a random CROP crop; only fine-tuning (finetune, evaluate fewshot/vtab) crops so, and there one number means PRECROP =
CROP (no crop margin). Verbs that do not crop accept two numbers only when they are equal.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable
from typing import Any, TypeVar

from ..core.errors import UserError

T = TypeVar("T")
_TYPES = {"int": int, "float": float, "str": str}


def _fields(config_class: type, only: Iterable[str] | None) -> list[dataclasses.Field]:
    by_name = {f.name: f for f in dataclasses.fields(config_class)}
    if only is None:
        return [f for f in by_name.values() if f.metadata.get("cli", True)]
    return [by_name[name] for name in only]


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _base_type(annotation: str) -> str:
    """'int | None' -> 'int'; 'tuple[int, ...]' -> 'tuple[int, ...]'."""
    if not isinstance(annotation, str):  # a module without `from __future__ import annotations`
        annotation = getattr(annotation, "__name__", str(annotation))
    return next(part.strip() for part in str(annotation).split("|") if part.strip() != "None")


def _option(f: dataclasses.Field, override: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The flag and add_argument keywords of one setting."""
    meta = {**f.metadata, **override}
    if "help" not in meta:
        raise TypeError(f"setting {f.name!r} has no help text; declare it with core.settings.setting")
    flag = meta.get("flag") or "--" + f.name.replace("_", "-")
    kw: dict[str, Any] = {"dest": f.name, "help": meta["help"], "default": _default(f)}
    if isinstance(kw["default"], tuple | list):  # shown as it is typed: 1 5 10, not (1, 5, 10)
        kw["help"] = kw["help"].replace("%(default)s", " ".join(map(str, kw["default"])))
    base = _base_type(f.type)
    if base == "bool":
        kw["action"] = "store_false" if kw["default"] else "store_true"
        return flag, kw
    if meta.get("kind") == "csv":  # one comma-separated word list: --sources icons,glyphs
        kw.update(type=_words, metavar=meta.get("metavar", f.name.upper()))
        return flag, kw
    if meta.get("kind") == "append":  # repeatable; not given: the setting's own default (the option's is None)
        kw.update(action="append", default=None, metavar=meta.get("metavar"))
        return flag, kw
    if meta.get("kind") == "resolution":
        crops = base.startswith("tuple")
        what = ("PRECROP CROP, or CROP alone for PRECROP = CROP (no crop margin)" if crops else
                "CROP (PRECROP CROP is accepted when equal: no pre-crop here)")
        kw.update(type=int, nargs="+", metavar="N", help=f"{what}: {meta['help']}")
        return flag, kw
    if base.startswith("tuple[") or base.startswith("list["):
        base = base[base.index("[") + 1:].split(",")[0].rstrip("]").strip()
        kw["nargs"] = "+"
    kw["type"] = _TYPES.get(base, str)
    for key in ("metavar", "choices", "nargs"):
        if key in meta:
            kw[key] = meta[key]
    if meta.get("required") or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING):
        kw["required"] = True
    return flag, kw


def _words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def add_options(parser: argparse.ArgumentParser | Any, config_class: type, only: Iterable[str] | None = None,
                **overrides: dict[str, Any]) -> None:
    """One option per setting of `config_class` (those marked cli=False left out), or per name in `only`, in that
    order; `overrides[name]` replaces parts of a setting's declaration for this verb (e.g. its help text)."""
    for f in _fields(config_class, only):
        flag, kw = _option(f, overrides.get(f.name, {}))
        parser.add_argument(flag, **kw)


def add_quiet(parser: argparse.ArgumentParser, help: str) -> None:  # noqa: A002 - argparse's word
    """`--quiet`, the one flag that silences progress in every verb (`--no-progress`, its old name in embed, is
    kept as a hidden alias)."""
    parser.add_argument("--quiet", action="store_true", help=help)
    parser.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)


def resolution_from(values: list[int] | int | None, precrop: bool) -> tuple[int, int] | int | None:
    """`--resolution`'s numbers as a config holds them: (PRECROP, CROP) where the verb crops, else CROP."""
    if values is None:
        return None
    if isinstance(values, int):  # converted already
        values = [values]
    if not 1 <= len(values) <= 2:
        raise UserError(f"--resolution takes CROP or PRECROP CROP (one or two numbers), got {len(values)}")
    if precrop:
        return (values[0], values[-1])
    if values[0] != values[-1]:
        raise UserError(f"--resolution {values[0]} {values[-1]}: this verb does not crop, so it takes no PRECROP; "
                        f"give one number (CROP)")
    return values[-1]


def config_from(config_class: type[T], args: argparse.Namespace, **explicit: Any) -> T:
    """A `config_class` from the options that name its fields (lists as tuples, --resolution converted), and
    `explicit` values for the others."""
    given = vars(args)
    values = {}
    for f in dataclasses.fields(config_class):
        if f.name not in given:
            continue
        value = given[f.name]
        if value is None and f.metadata.get("kind") == "append":
            continue
        if f.metadata.get("kind") == "resolution":
            value = resolution_from(value, precrop=_base_type(f.type).startswith("tuple"))
        elif isinstance(value, list) and _base_type(f.type).startswith("tuple"):
            value = tuple(value)
        values[f.name] = value
    return config_class(**{**values, **explicit})
