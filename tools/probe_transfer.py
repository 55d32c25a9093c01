"""Transfer probes of pre-trained checkpoints on the demo's tasks: the evidence behind BiT-Mini's model card.

For each checkpoint (a .safetensors file, or a pre-training run's state.pt together with --data): the linear probe on
frozen features at K = 1 and 10 per class (`bigtransfer evaluate linear`'s code), and fine-tuning as `make demo`
runs it (same data, steps, batch, resolution; --seeds seeds) beside the same architecture from scratch. One JSON
record per checkpoint goes to OUT/probes.jsonl and a Markdown table is printed:

    python tools/probe_transfer.py --out /tmp/probes --arch R26x0.5 --data /root/bitmini/packed \\
        RUN/state.pt other.safetensors --seeds 3 --base-lr 0.5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from state_to_checkpoint import model_from_state  # the sibling tool (a script's folder is on sys.path)

from bigtransfer.evaluation.linear import FrozenEvalConfig, run_frozen_eval
from bigtransfer.model.checkpoints import save_checkpoint
from bigtransfer.transfer.config import DEMO_TASK_NAMES
from bigtransfer.transfer.demo import DemoModel, DemoSettings, run_demo, write_digits


def as_checkpoint(path: Path, arch: str, data: str | None, work: Path) -> Path:
    """A checkpoint file for `path`: itself, or the weights of a run's state.pt written as safetensors."""
    if path.suffix != ".pt":
        return path
    if data is None:
        raise SystemExit(f"{path}: a state.pt needs --data (the run's training data names its classes)")
    model, step = model_from_state(str(path), data, arch)
    out = work / f"{path.parent.name}-{path.stem}-{step}.safetensors"
    save_checkpoint(model, out, source="probe", pretrain_step=str(step))
    return out


def linear_probe(weights: Path, digits: Path, k: int, resolution: int, out: Path) -> float:
    """Top-1 of the linear probe on frozen features, K images per class (seed 0), digits' fixed test split."""
    config = FrozenEvalConfig(method="linear", data=str(digits), out=str(out), weights=str(weights),
                              examples_per_class=k, resolution=resolution, workers=0, use_cache=False)
    return float(run_frozen_eval(config, say=lambda _: None)["top1"])


def _medians(runs: dict[str, dict[int, list[float]]]) -> dict[str, dict[int, float]]:
    return {t: {k: float(np.median(v)) for k, v in row.items()} for t, row in runs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--arch", default="R26x0.5")
    p.add_argument("--data", help="the pre-training data of any state.pt given (names its classes)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--base-lr", type=float, default=0.5, help="fine-tuning base lr at batch 512 (both models)")
    p.add_argument("--steps", type=int, default=DemoSettings.steps)
    p.add_argument("--resolution", type=int, nargs=2, default=DemoSettings.resolution, metavar=("PRECROP", "CROP"),
                   help="fine-tuning resolution (the linear probe uses CROP); default the demo's")
    p.add_argument("--tasks", nargs="+", default=list(DEMO_TASK_NAMES), choices=DEMO_TASK_NAMES,
                   help="the demo's tasks to fine-tune on (the linear probe is on the digits)")
    args = p.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    digits = write_digits(args.out / "digits")
    settings = DemoSettings(tasks=tuple(args.tasks), shots=tuple(args.shots), seeds=args.seeds, steps=args.steps,
                            resolution=tuple(args.resolution))
    rows = []
    for i, path in enumerate(args.checkpoints):
        ckpt = as_checkpoint(path, args.arch, args.data, args.out)
        lin = {k: linear_probe(ckpt, digits, k, settings.resolution[1], args.out / f"lin{i}-k{k}") for k in (1, 10)}
        models = (DemoModel(f"probe{i}", args.arch, weights=str(ckpt), base_lr=args.base_lr),)
        if i == 0:  # scratch once: its runs do not depend on the checkpoint
            models += (DemoModel("scratch", args.arch, base_lr=args.base_lr),)
        runs = run_demo(args.out / "demo", settings, models, quiet=True)
        by_model: dict[str, dict[str, dict[int, list[float]]]] = {}  # model -> task -> K -> top-1 per seed
        jobs = [(m.title, t, k) for t in settings.tasks for k in settings.shots for _ in range(settings.seeds)
                for m in models]  # run_demo's order
        for (title, t, k), r in zip(jobs, runs, strict=True):
            by_model.setdefault(title, {}).setdefault(t, {}).setdefault(k, []).append(r["top1"])
        record = {"checkpoint": str(path), "linear": lin, "finetune_median": _medians(by_model[f"probe{i}"]),
                  "finetune": by_model[f"probe{i}"]}
        if "scratch" in by_model:
            rows.append({"checkpoint": "scratch", "finetune_median": _medians(by_model["scratch"])})
        rows.append(record)
        with open(args.out / "probes.jsonl", "a") as f:
            f.write(json.dumps(record | {"seeds": args.seeds, "base_lr": args.base_lr, "steps": args.steps}) + "\n")
    print("| checkpoint | linear K=1 | linear K=10 | " + " | ".join(
        f"{t} K={k}" for t in settings.tasks for k in settings.shots) + " |")
    for r in rows:
        lin = r.get("linear", {})
        cells = [f"{lin[k]:.3f}" if k in lin else "-" for k in (1, 10)]
        cells += [f"{r['finetune_median'][t][k]:.3f}" for t in settings.tasks for k in settings.shots]
        print(f"| {r['checkpoint']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
