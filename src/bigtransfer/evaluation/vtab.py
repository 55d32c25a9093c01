"""The VTAB-1k protocol (spec section 5): per task, optionally pick settings on 800/200, then train on 1000, test.

For every task found under ROOT (`bigtransfer.evaluation.vtab_tasks.read_vtab`; missing ones are reported and
skipped), settings are the HyperRule's (the paper's headline protocol, 76.3% for BiT-L), or picked on train800 -> val200 by
- `sweep`: one fine-tune per candidate of SWEEP_LRS x sweep steps, or
- `tuned`: the paper's Appendix A random search (78.7% for BiT-L): `trials` fine-tunes, each with settings drawn
  at random (`tuned_trial`: lr log-uniform in 1e-4..1e-1, steps, resolution and MixUp alpha from TUNED_*),
  seeded by task and trial number, so a re-run (or a run with more trials) draws the same ones again;
the best on val200 is picked (ties: the first candidate). Then the final fine-tunes on train800val200 with those
settings, scored on test, one per seed (3 by default, as the paper); the task's score is the median over seeds,
with min, max and mean beside it. Training respects each task's flip/crop flags. Scores are averaged per group
and overall (`vtab.group_means`).

OUT holds config.json, results.json, results.md, accuracy_per_task.png and, per task, OUT/<task>/ with the two
split manifests it trains from (train800-val200.csv, train800val200-test.csv), sweep/lr<LR>-steps<S>/ (or
sweep/trial<NN>/) and final/seed<S>/ (one `bigtransfer finetune` run directory each).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Any

from ..core.atomic import write_text
from ..core.runfolder import own_folder
from ..engine.plots import error_bar_plot
from .config import SEEDS, SWEEP_LRS, TUNED_TRIALS, VtabConfig  # noqa: F401 - re-exported
from .protocol_runs import (
    TRAIN_SETTINGS,
    Say,
    TrainOptions,
    check_out_dir,
    markdown_table,
    percent,
    run_or_reuse,
    save_json,
    spread,
    text_table,
    time_note,
    write_split_manifest,
)
from .vtab_tasks import group_means, read_vtab

# Appendix A's random search space as far as this fine-tuning loop can follow it: lr log-uniform, and steps, crop
# size and MixUp alpha from these sets (0: no MixUp). The appendix also draws a dropout rate for the pre-logits
# and a weight decay towards the initial weights; this loop has neither (docs/evaluation.md says so).
TUNED_LR_RANGE = (1e-4, 1e-1)
TUNED_STEPS = (500, 1000, 2000, 4000, 8000, 16000)
TUNED_RESOLUTIONS = (64, 128, 192, 256, 320, 384)
TUNED_MIXUP = (0.0, 0.05, 0.1, 0.2, 0.4)


def vtab_candidates(c: VtabConfig, task: str) -> list[tuple[str, dict[str, Any]]]:
    """(run folder name, fine-tuning settings) of every candidate for `task`, in the order ties are broken.

    The grid (`sweep`) gives base_lr and steps (None: the HyperRule's length); `tuned` trials add resolution
    and mixup_alpha.
    """
    if c.tuned:
        return [(f"trial{i:02d}", tuned_trial(task, i, c.train)) for i in range(c.trials)]
    steps = c.sweep_steps if c.sweep_steps is not None else (c.train.steps,)
    return [(_slug(lr, s), {"base_lr": lr, "steps": s}) for lr in c.sweep_lrs for s in steps]


def _slug(lr: float, steps: int | None) -> str:
    return f"lr{lr:g}-steps{steps if steps is not None else 'rule'}"


def tuned_trial(task: str, trial: int, train: TrainOptions) -> dict[str, Any]:
    """The settings of one Appendix A trial: drawn from a generator seeded by (task, trial).

    Every draw is made whatever is fixed, so --steps or --resolution (which fix that setting for every trial)
    leave the other draws unchanged. The resolution drawn is the crop; images are first resized to 1.25x it (the
    HyperRule's 160 -> 128 ratio).
    """
    rng = random.Random(f"vtab-tuned:{task}:{trial}")
    lo, hi = TUNED_LR_RANGE
    lr = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    steps, crop, alpha = rng.choice(TUNED_STEPS), rng.choice(TUNED_RESOLUTIONS), rng.choice(TUNED_MIXUP)
    return {"base_lr": lr, "steps": train.steps if train.steps is not None else steps,
            "resolution": tuple(train.resolution) if train.resolution is not None else (crop * 5 // 4, crop),
            "mixup_alpha": alpha}


def _manifest_rows(task: Any, train_split: str, eval_split: str, eval_kind: str) -> list[tuple[str, str, str]]:
    names = task.classes
    return ([(it.source, names[it.label], "train") for it in task.splits[train_split]]
            + [(it.source, names[it.label], eval_kind) for it in task.splits[eval_split]])


def run_vtab(config: VtabConfig, say: Say = print) -> dict[str, Any]:
    """Run the protocol on every task found (reusing finished runs), write the results and return them."""
    t0 = time.perf_counter()
    c = config.normalized()
    with own_folder(c.out, "output folder"):
        return _run_vtab(c, say, t0)


def _run_vtab(c: VtabConfig, say: Say, t0: float) -> dict[str, Any]:
    out = Path(c.out)
    data = read_vtab(c.root, c.tasks)
    say(data.report())
    if not data.tasks:
        raise FileNotFoundError(f"{c.root}: none of the {'requested ' if c.tasks else ''}VTAB-1k tasks is usable "
                                f"(expected ROOT/<task>/{{train800,val200,train800val200,test}})")
    c.train.finetune_config(c.root, out / "check").normalized()  # the model and weights, before any training
    if not c.overwrite:
        check_out_dir(out, c, ["root", *(f"train.{k}" for k in TRAIN_SETTINGS)])
    save_json(out / "config.json", dataclasses.asdict(c))
    tasks: dict[str, dict[str, Any]] = {}
    for i, td in enumerate(data.tasks, 1):
        say(f"[{i}/{len(data.tasks)}] {td.task.name} ({td.task.group}; flip {'on' if td.task.flip else 'off'}, "
            f"crop {'on' if td.task.crop else 'off'})")
        tasks[td.task.name] = _run_task(c, td, out / td.task.name, say)
    scores = {name: t["top1"] for name, t in tasks.items()}

    results = {
        "protocol": "vtab-1k",
        "root": c.root,
        "model": c.train.model,
        "weights": c.train.weights,
        "sweep": c.sweep,
        "tuned": c.tuned,
        "trials": c.trials if c.tuned else None,
        "seeds": c.seeds,
        "statistic": "per task: top-1 on test, median over seeds; groups and overall: mean over the tasks present",
        "tasks": tasks,
        "groups": group_means(scores),
        "missing": [{"task": n, "reason": why} for n, why in data.missing],
        "wall_time_s": time.perf_counter() - t0,
        "train_time_s": sum(r["wall_time_s"] for t in tasks.values() for r in _all_runs(t)),  # reused ones too
        "runs_reused": sum(r["reused"] for t in tasks.values() for r in _all_runs(t)),
    }
    _write_outputs(out, c, results)
    say(text_table(*_task_table(results)))
    say(text_table(*_group_table(results)))
    say(f"results: {out / 'results.md'}, {out / 'results.json'}, {out / 'accuracy_per_task.png'}")
    return results


def _all_runs(task: dict[str, Any]) -> list[dict[str, Any]]:
    return [*task.get("sweep", {}).get("candidates", []), *task["runs"]]


def _run_record(summary: dict[str, Any], reused: bool, run: str, **extra: Any) -> dict[str, Any]:
    return {"base_lr": summary.get("base_lr"), **extra, "top1": summary["top1"], "top5": summary["top5"],
            "steps": summary["steps"], "examples": summary["examples"], "eval_examples": summary["eval_examples"],
            "wall_time_s": summary["wall_time_s"], "reused": reused, "run": run}


def _describe(settings: dict[str, Any], run: dict[str, Any]) -> str:
    """The settings of a run as it ran: its lr (the model's recommended one when none was set) and length."""
    text = f"lr {run.get('base_lr') or settings['base_lr']:.3g}, {run['steps']} steps"
    if "resolution" in settings:
        text += f", {settings['resolution'][1]} px, mixup {settings['mixup_alpha']:g}"
    return text


def _pick(c: VtabConfig, td: Any, task_out: Path, flags: dict[str, bool], say: Say) -> dict[str, Any]:
    """Fine-tune every candidate on train800, score on val200; {"candidates": records, "chosen": settings}."""
    manifest = task_out / "train800-val200.csv"
    # A rewritten manifest means the task's files changed: finished runs on the old one must not be reused.
    fresh = not write_split_manifest(manifest, _manifest_rows(td, "train800", "val200", "val"))
    candidates, settings = [], []
    pool = vtab_candidates(c, td.task.name)
    for i, (name, cand) in enumerate(pool, 1):
        rc = c.train.finetune_config(manifest, task_out / "sweep" / name, seed=0, overwrite=c.overwrite,
                                     **flags, **cand)
        summary, reused = run_or_reuse(rc, reuse=fresh)
        record = {("steps_setting" if k == "steps" else k): v for k, v in cand.items()}
        candidates.append(_run_record(summary, reused, rc.out, **record))
        settings.append(cand)
        say(f"  {'trial' if c.tuned else 'sweep'} {i}/{len(pool)} {_describe(cand, summary)}: val200 top-1 "
            f"{summary['top1']:.4f}" + (" (reused)" if reused else f" ({summary['wall_time_s']:.1f} s)"))
    best = max(range(len(candidates)), key=lambda j: (candidates[j]["top1"], -j))  # ties: the first candidate
    say(f"  picked {_describe(settings[best], candidates[best])}")
    return {"candidates": candidates, "chosen": settings[best]}


def _run_task(c: VtabConfig, td: Any, task_out: Path, say: Say) -> dict[str, Any]:
    flags = {"flip": td.task.flip, "crop": td.task.crop}
    chosen: dict[str, Any] = {"base_lr": c.train.base_lr, "steps": c.train.steps}
    result: dict[str, Any] = {"group": td.task.group, **flags, "classes": len(td.classes)}
    if c.sweep or c.tuned:
        result["sweep"] = _pick(c, td, task_out, flags, say)
        chosen = result["sweep"]["chosen"]
    manifest = task_out / "train800val200-test.csv"
    fresh = not write_split_manifest(manifest, _manifest_rows(td, "train800val200", "test", "test"))
    runs = []
    for seed in range(c.seeds):
        rc = c.train.finetune_config(manifest, task_out / "final" / f"seed{seed}", seed=seed, overwrite=c.overwrite,
                                     **flags, **chosen)
        summary, reused = run_or_reuse(rc, reuse=fresh)
        runs.append(_run_record(summary, reused, rc.out, seed=seed))
        say(f"  final seed {seed} ({_describe(chosen, summary)}, {summary['examples']} images): test top-1 "
            f"{summary['top1']:.4f} on {summary['eval_examples']} images"
            + (" (reused)" if reused else f" ({summary['wall_time_s']:.1f} s)"))
    stats = spread([r["top1"] for r in runs])
    result.update(top1=stats["median"], top1_min=stats["min"], top1_max=stats["max"], top1_mean=stats["mean"],
                  seeds=len(runs), base_lr=runs[0]["base_lr"] or chosen["base_lr"], steps=runs[0]["steps"],
                  runs=runs, notes=td.notes)
    return result


def _task_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["#", "task", "group", "flip", "crop", "lr", "steps", "runs", "median top-1 %", "min %", "max %"]
    rows = [[str(i), name, t["group"], "yes" if t["flip"] else "no", "yes" if t["crop"] else "no",
             f"{t['base_lr']:.3g}", str(t["steps"]), str(t["seeds"]), percent(t["top1"]), percent(t["top1_min"]),
             percent(t["top1_max"])]
            for i, (name, t) in enumerate(results["tasks"].items(), 1)]
    return header, rows


def _group_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    counts = {g: sum(t["group"] == g for t in results["tasks"].values()) for g in results["groups"]}
    counts["overall"] = len(results["tasks"])
    return (["group", "tasks", "mean top-1 %"],
            [[g, str(counts[g]), percent(v)] for g, v in results["groups"].items()])


def _write_outputs(out: Path, c: VtabConfig, results: dict[str, Any]) -> None:
    save_json(out / "results.json", results)
    weights = f", weights {c.train.weights}" if c.train.weights else ""
    if c.tuned:
        how = (f"settings picked on val200 by the paper's Appendix A random search, {c.trials} trial"
               f"{'s' * (c.trials != 1)} per task")
    elif c.sweep:
        how = (f"settings picked on val200 from lr {{{', '.join(f'{v:g}' for v in c.sweep_lrs)}}} x steps "
               f"{{{', '.join(str(s) if s is not None else 'HyperRule' for s in (c.sweep_steps or (c.train.steps,)))}}}")
    else:
        how = "BiT-HyperRule settings (no sweep), the paper's headline protocol"
    md = [f"# VTAB-1k: {c.train.model}{weights}", "",
          f"Root: `{c.root}`. Final fine-tune on train800val200, top-1 on test ({how}; median over {c.seeds} "
          f"seed{'s' * (c.seeds != 1)}). Accuracy in percent.", "",
          markdown_table(*_task_table(results)), "", markdown_table(*_group_table(results)), ""]
    if results["missing"]:
        md += ["Missing or unusable tasks (skipped):", ""]
        md += [f"- {m['task']}: {m['reason']}" for m in results["missing"]] + [""]
    md.append(time_note(results, sum(len(_all_runs(t)) for t in results["tasks"].values())))
    write_text(out / "results.md", "\n".join(md) + "\n")
    series: dict[str, list[tuple[float, float, float, float]]] = {}
    for i, t in enumerate(results["tasks"].values(), 1):
        series.setdefault(t["group"], []).append((i, t["top1"], t["top1_min"], t["top1_max"]))
    error_bar_plot(out / "accuracy_per_task.png", series, "VTAB-1k top-1 per task (x: task # in results.md)",
                   "task #", "top-1 accuracy")
