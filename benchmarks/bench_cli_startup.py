"""Start-up time of the command line: `bigtransfer --help` and `bigtransfer VERB --help`, each in a fresh process.

Each command runs `--runs` times, interleaved, and the median wall time is printed, with the import time of building
the whole parser (`python -X importtime`, bigtransfer.cli's cumulative figure) and whether torch got loaded. The goal
(issue 12/13): under 1 s for `bigtransfer --help`, which needs torch (about 2 s to import) to stay unloaded.
Run: `.venv/bin/python benchmarks/bench_cli_startup.py [--runs 8]`. On a shared machine run it twice.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = [["--help"], ["finetune", "--help"], ["pretrain", "--help"], ["evaluate", "linear", "--help"]]


def wall_time(argv: list[str]) -> float:
    """Seconds one `python -m bigtransfer ARGV` takes, start to exit."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bigtransfer", *argv], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def parser_import_time() -> tuple[float, bool]:
    """(seconds of imports under bigtransfer.cli when building every verb's parser, whether torch was imported)."""
    code = "from bigtransfer.cli import build_parser; build_parser()"
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], check=True, capture_output=True,
                         text=True).stderr
    cumulative = {line.split("|")[2].strip(): int(line.split("|")[1]) for line in err.splitlines()
                  if line.startswith("import time:") and line.count("|") == 2 and "cumulative" not in line}
    return cumulative.get("bigtransfer.cli", 0) / 1e6, "torch" in cumulative


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8, help="runs of each command (default 8)")
    args = ap.parse_args()
    times: dict[str, list[float]] = {" ".join(c): [] for c in COMMANDS}
    for _ in range(args.runs):
        for command in COMMANDS:  # interleaved: a burst of background load hits every command alike
            times[" ".join(command)].append(wall_time(command))
    for name, values in times.items():
        print(f"bigtransfer {name:<24} median {statistics.median(values) * 1000:7.0f} ms  (min "
              f"{min(values) * 1000:.0f}, max {max(values) * 1000:.0f}, {len(values)} runs)")
    seconds, torch_loaded = parser_import_time()
    print(f"imports while building every verb's parser: {seconds * 1000:.0f} ms; torch loaded: {torch_loaded}")


if __name__ == "__main__":
    main()
