"""The VTAB-1k protocol (spec section 5): per task, optionally pick settings on 800/200, then train on 1000, test.

For every task found under ROOT (`bigtransfer.vtab.read_vtab`; missing ones are reported and skipped):
with `sweep`, one fine-tune on train800 per candidate of SWEEP_LRS x sweep steps, scored on val200, the best
picked (ties: the first in grid order); then the final fine-tune(s) on train800val200 with the picked settings
(else the HyperRule's), scored on test, one per seed; the task's score is the median over seeds. Training
respects each task's flip/crop flags. Scores are averaged per group and overall (`vtab.group_means`).

OUT holds config.json, results.json, results.md, accuracy_per_task.png and, per task, OUT/<task>/ with the two
split manifests it trains from (train800-val200.csv, train800val200-test.csv), sweep/lr<LR>-steps<S>/ and
final/seed<S>/ (one `bigtransfer finetune` run directory each).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checks import check_out_folder, check_positive, check_positive_all
from .errors import UserError
from .protocols import (
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

# The default sweep: the HyperRule's lr and one step of about 3x either side, at the HyperRule's length.
# The spec fixes no VTAB grid; wider grids are a --sweep-lr / --sweep-steps away.
SWEEP_LRS: tuple[float, ...] = (0.001, 0.003, 0.01)


@dataclass
class VtabConfig:
    """Every setting of a VTAB-1k evaluation; saved as OUT/config.json."""

    root: str  # ROOT/<task>/{train800,val200,train800val200,test}
    out: str
    tasks: list[str] | None = None  # None: all 19
    sweep: bool = False  # pick lr and steps on train800 -> val200 before the final run
    sweep_lrs: tuple[float, ...] = SWEEP_LRS  # base lr candidates (at batch 512)
    sweep_steps: tuple[int, ...] | None = None  # step candidates; None: train.steps alone (the HyperRule's if None)
    seeds: int = 1  # final runs per task, seeds 0 .. seeds-1; the task's score is their median
    train: TrainOptions = field(default_factory=TrainOptions)
    overwrite: bool = False  # re-run every run from scratch

    def normalized(self) -> VtabConfig:
        """A checked copy with absolute paths."""
        c = dataclasses.replace(self, train=self.train.normalized())
        check_positive("seeds", c.seeds)
        c.sweep_lrs = tuple(float(v) for v in c.sweep_lrs)
        if not c.sweep_lrs or any(not v > 0 for v in c.sweep_lrs):
            raise UserError(f"sweep lrs must be positive numbers, got {list(c.sweep_lrs)}")
        if c.sweep_steps is not None:
            c.sweep_steps = tuple(c.sweep_steps)
            check_positive_all("sweep steps", c.sweep_steps)
        c.root = str(Path(c.root).expanduser().resolve())
        c.out = str(Path(c.out).expanduser().resolve())
        check_out_folder(c.out)
        return c

    def candidates(self) -> list[tuple[float, int | None]]:
        """The sweep grid as (base lr, steps) pairs in grid order (steps None: the HyperRule's length)."""
        steps = self.sweep_steps if self.sweep_steps is not None else (self.train.steps,)
        return [(lr, s) for lr in self.sweep_lrs for s in steps]


def _slug(lr: float, steps: int | None) -> str:
    return f"lr{lr:g}-steps{steps if steps is not None else 'rule'}"


def _manifest_rows(task: Any, train_split: str, eval_split: str, eval_kind: str) -> list[tuple[str, str, str]]:
    names = task.classes
    return ([(it.source, names[it.label], "train") for it in task.splits[train_split]]
            + [(it.source, names[it.label], eval_kind) for it in task.splits[eval_split]])


def run_vtab(config: VtabConfig, say: Say = print) -> dict[str, Any]:
    """Run the protocol on every task found (reusing finished runs), write the results and return them."""
    from .vtab import read_vtab

    t0 = time.perf_counter()
    c = config.normalized()
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
    from .vtab import group_means

    results = {
        "protocol": "vtab-1k",
        "root": c.root,
        "model": c.train.model,
        "weights": c.train.weights,
        "sweep": c.sweep,
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


def _run_task(c: VtabConfig, td: Any, task_out: Path, say: Say) -> dict[str, Any]:
    flags = {"flip": td.task.flip, "crop": td.task.crop}
    lr, steps = c.train.base_lr, c.train.steps
    result: dict[str, Any] = {"group": td.task.group, **flags, "classes": len(td.classes)}
    if c.sweep:
        manifest = task_out / "train800-val200.csv"
        # A rewritten manifest means the task's files changed: finished runs on the old one must not be reused.
        fresh = not write_split_manifest(manifest, _manifest_rows(td, "train800", "val200", "val"))
        candidates = []
        for cand_lr, cand_steps in c.candidates():
            rc = c.train.finetune_config(manifest, task_out / "sweep" / _slug(cand_lr, cand_steps), seed=0,
                                         base_lr=cand_lr, steps=cand_steps, overwrite=c.overwrite, **flags)
            summary, reused = run_or_reuse(rc, reuse=fresh)
            candidates.append(_run_record(summary, reused, rc.out, base_lr=cand_lr, steps_setting=cand_steps))
            say(f"  sweep lr {cand_lr:g}, {summary['steps']} steps: val200 top-1 {summary['top1']:.4f}"
                + (" (reused)" if reused else f" ({summary['wall_time_s']:.1f} s)"))
        best = max(range(len(candidates)), key=lambda j: (candidates[j]["top1"], -j))  # ties: first in grid order
        lr, steps = candidates[best]["base_lr"], candidates[best]["steps_setting"]
        result["sweep"] = {"candidates": candidates, "chosen": {"base_lr": lr, "steps": steps}}
        say(f"  picked lr {lr:g}, {candidates[best]['steps']} steps")
    manifest = task_out / "train800val200-test.csv"
    fresh = not write_split_manifest(manifest, _manifest_rows(td, "train800val200", "test", "test"))
    runs = []
    for seed in range(c.seeds):
        rc = c.train.finetune_config(manifest, task_out / "final" / f"seed{seed}", seed=seed, base_lr=lr, steps=steps,
                                     overwrite=c.overwrite, **flags)
        summary, reused = run_or_reuse(rc, reuse=fresh)
        runs.append(_run_record(summary, reused, rc.out, seed=seed))
        say(f"  final seed {seed} (lr {runs[-1]['base_lr'] or lr:g}, {summary['steps']} steps, {summary['examples']} "
            f"images): test top-1 {summary['top1']:.4f}" + (" (reused)" if reused else f" ({summary['wall_time_s']:.1f} s)"))
    stats = spread([r["top1"] for r in runs])
    result.update(top1=stats["median"], top1_min=stats["min"], top1_max=stats["max"], top1_mean=stats["mean"],
                  base_lr=runs[0]["base_lr"] or lr, steps=runs[0]["steps"], runs=runs, notes=td.notes)
    return result


def _task_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["#", "task", "group", "flip", "crop", "lr", "steps", "top-1 %", "min %", "max %"]
    rows = [[str(i), name, t["group"], "yes" if t["flip"] else "no", "yes" if t["crop"] else "no",
             f"{t['base_lr']:g}", str(t["steps"]), percent(t["top1"]), percent(t["top1_min"]), percent(t["top1_max"])]
            for i, (name, t) in enumerate(results["tasks"].items(), 1)]
    return header, rows


def _group_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    counts = {g: sum(t["group"] == g for t in results["tasks"].values()) for g in results["groups"]}
    counts["overall"] = len(results["tasks"])
    return (["group", "tasks", "mean top-1 %"],
            [[g, str(counts[g]), percent(v)] for g, v in results["groups"].items()])


def _write_outputs(out: Path, c: VtabConfig, results: dict[str, Any]) -> None:
    from .atomic import write_text
    from .plots import error_bar_plot

    save_json(out / "results.json", results)
    weights = f", weights {c.train.weights}" if c.train.weights else ""
    how = (f"settings picked on val200 from lr {{{', '.join(f'{v:g}' for v in c.sweep_lrs)}}} x steps "
           f"{{{', '.join(str(s) if s is not None else 'HyperRule' for s in (c.sweep_steps or (c.train.steps,)))}}}"
           if c.sweep else "BiT-HyperRule settings (no sweep)")
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
