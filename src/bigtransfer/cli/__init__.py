"""The `bigtransfer` command line: one sub-module per verb, each with register() and run().

Building the parser imports every verb module, so a verb imports at its top only its config (the `config` modules,
which do not load torch; options.py generates the options from their fields) and the machinery it runs inside
run(): `bigtransfer --help` must not wait for torch (benchmarks/bench_cli_startup.py; tests/test_cli_options.py
fails if building the parser loads torch or numpy).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..core.errors import is_user_error
from ..core.runfolder import StopRequested

# Verb modules, in the order --help lists them. Each defines HELP, register(parser) and run(args) -> int.
VERBS = ["models", "convert", "hyperrule", "finetune", "distill", "demo", "predict", "embed", "export", "evaluate",
         "pretrain", "corpus", "pack"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every verb."""
    parser = argparse.ArgumentParser(
        prog="bigtransfer",
        description="Big Transfer (BiT): pre-trained ResNet-v2 models, HyperRule fine-tuning, evaluation.",
        epilog="Run 'bigtransfer VERB --help' for a verb's options.",
    )
    from ..core.version import __version__

    parser.add_argument("--version", action="version", version=f"bigtransfer {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name in VERBS:
        module = importlib.import_module(f".{name}", __name__)
        p = sub.add_parser(name.replace("_", "-"), help=module.HELP, description=module.HELP)
        module.register(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    if hasattr(sys.stdout, "reconfigure"):
        # A file name that is not UTF-8 prints with escapes (as on stderr) instead of ending the run in an error.
        sys.stdout.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except StopRequested as e:  # SIGTERM: the run saved its state at a step boundary
        if e.report:
            print(f"bigtransfer {args.verb}: {e}", file=sys.stderr, flush=True)
        return e.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`bigtransfer models | head`): stop quietly, as Unix tools do. Pointing stdout at
        # devnull keeps the interpreter's final flush from raising the same error again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        # Errors in the user's input (UserError, OS errors about their paths) are one line; anything else is a bug
        # and keeps its traceback.
        if not is_user_error(e):
            raise
        print(f"bigtransfer {args.verb}: error: {e}", file=sys.stderr)
        return 2
