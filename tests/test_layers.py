"""The package's layers (docs/architecture.md): every module sits in a subpackage, and imports flow one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bigtransfer

# Lowest first: a module may import its own subpackage and the ones before it in this list, never one after it.
LAYERS = ("core", "data", "model", "corpus", "engine", "deploy", "transfer", "upstream", "evaluation", "cli")
PACKAGE = Path(bigtransfer.__file__).parent
TOP = len(LAYERS)  # bigtransfer/__init__.py and __main__.py: the public API, above every layer


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    """The layer of a module of the package; the top-level package itself is above them all."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else TOP


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Every bigtransfer module `source` imports, anywhere in it (functions included), as absolute names."""
    found = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module:
                found.add(target)
            else:  # `from .. import x`: x is a module of that package (or a name of the top-level one)
                found.update(f"{target}.{a.name}" for a in node.names)
    return {m for m in found if m == "bigtransfer" or m.startswith("bigtransfer.")}


def upward_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """The imports of `module` that reach a higher layer than its own."""
    own = _layer(module)
    return sorted(m for m in imported_modules(source, module, is_package) if _layer(m) > own)


def test_every_module_is_in_a_layer():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert loose == []
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(LAYERS)


def test_no_layer_imports_a_higher_one():
    problems = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        bad = upward_imports(path.read_text(encoding="utf-8"), module, path.name == "__init__.py")
        if bad:
            problems[module] = bad
    assert problems == {}


@pytest.mark.parametrize(("source", "module", "bad"), [
    ("from ..transfer.finetune import run_finetune\n", "bigtransfer.engine.runstate", ["bigtransfer.transfer.finetune"]),
    ("def f():\n    from ..cli import main\n", "bigtransfer.model.factory", ["bigtransfer.cli"]),
    ("import bigtransfer.evaluation.vtab\n", "bigtransfer.data.images", ["bigtransfer.evaluation.vtab"]),
    ("from .. import create_model\n", "bigtransfer.deploy.inference", ["bigtransfer.create_model"]),
    ("from . import distributed\n", "bigtransfer.upstream.pretrain", []),
    ("from ..core.errors import UserError\nfrom .resnetv2 import ResNetV2\n", "bigtransfer.model.factory", []),
    ("from ..model import resnetv2\n", "bigtransfer.transfer.finetune", []),
])
def test_the_walker_sees_upward_imports_wherever_they_are(source, module, bad):
    assert upward_imports(source, module) == bad
