"""The few-shot protocol (spec section 5): for each K and seed, a HyperRule fine-tune on K images per class.

Every run trains on a balanced K-shot subset chosen by its seed and is scored on the same held-out split (the
data's val/ or test/, else a per-class split drawn with `split_seed`, which does not move with the seed). The
score of a K is the median over seeds (with mean, min and max). OUT holds config.json, k<K>/seed<S>/ (one
`bigtransfer finetune` run directory each), results.json, results.md and accuracy_vs_shots.png.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from ..core.atomic import write_text
from ..core.runfolder import own_folder
from ..data.datasets import load_splits
from ..engine.plots import error_bar_plot
from .config import DEFAULT_SEEDS, DEFAULT_SHOTS, FewShotConfig  # noqa: F401 - re-exported
from .protocol_runs import (
    TRAIN_SETTINGS,
    Say,
    check_out_dir,
    markdown_table,
    percent,
    run_or_reuse,
    save_json,
    spread,
    text_table,
    time_note,
)

_SPLIT_WORDS = {"val": "val", "test": "test", "split": "held-out"}  # how DataSplits.eval_name reads in a sentence


def run_dir(out: str | Path, shots: int, seed: int) -> Path:
    """The run directory of one (K, seed)."""
    return Path(out) / f"k{shots}" / f"seed{seed}"


def run_fewshot(config: FewShotConfig, say: Say = print) -> dict[str, Any]:
    """Fine-tune for every K and seed (reusing finished runs), write the results and return them."""
    t0 = time.perf_counter()
    c = config.normalized()
    with own_folder(c.out, "output folder"):
        return _run_fewshot(c, say, t0)


def _run_fewshot(c: FewShotConfig, say: Say, t0: float) -> dict[str, Any]:
    out = Path(c.out)
    # Before any training: the largest K must fit every class, and the data and model must be usable.
    probe = load_splits(c.data, seed=0, split_seed=c.split_seed, examples_per_class=max(c.shots),
                        val_fraction=c.val_fraction, check_images=False)
    c.train.finetune_config(c.data, run_dir(out, c.shots[0], 0)).normalized()
    if not c.overwrite:
        check_out_dir(out, c, ["data", "split_seed", "val_fraction", *(f"train.{k}" for k in TRAIN_SETTINGS)])
    save_json(out / "config.json", dataclasses.asdict(c))
    n_runs = len(c.shots) * c.seeds
    say(f"few-shot: {len(probe.classes)} classes, K = {', '.join(map(str, c.shots))}, {c.seeds} seed"
        f"{'s' * (c.seeds != 1)} each ({n_runs} fine-tunes of {c.train.model}); scored on {len(probe.eval)} "
        f"{_SPLIT_WORDS[probe.eval_name]} images")
    per_k: dict[int, dict[str, Any]] = {}
    done = 0
    for k in c.shots:
        runs = []
        for seed in range(c.seeds):
            rc = c.train.finetune_config(c.data, run_dir(out, k, seed), examples_per_class=k, seed=seed,
                                         split_seed=c.split_seed, val_fraction=c.val_fraction, overwrite=c.overwrite)
            summary, reused = run_or_reuse(rc)
            done += 1
            runs.append({"seed": seed, "top1": summary["top1"], "top5": summary["top5"], "steps": summary["steps"],
                         "examples": summary["examples"], "eval_examples": summary["eval_examples"],
                         "wall_time_s": summary["wall_time_s"], "reused": reused, "run": rc.out})
            say(f"[{done}/{n_runs}] K={k} seed {seed}: top-1 {summary['top1']:.4f} "
                + ("(finished earlier, reused)" if reused else f"({summary['wall_time_s']:.1f} s)"))
        top5 = [r["top5"] for r in runs if r["top5"] is not None]  # None: 5 classes or fewer, where top-5 says nothing
        per_k[k] = {**spread([r["top1"] for r in runs]),
                    "top5_median": spread(top5)["median"] if len(probe.classes) > 5 and top5 else None, "runs": runs}
    results = _results(c, probe, per_k, time.perf_counter() - t0)
    _write_outputs(out, c, results)
    say(text_table(*_table(results)))
    say(f"results: {out / 'results.md'}, {out / 'results.json'}, {out / 'accuracy_vs_shots.png'}")
    return results


def _results(c: FewShotConfig, probe: Any, per_k: dict[int, dict[str, Any]], seconds: float) -> dict[str, Any]:
    runs = [r for v in per_k.values() for r in v["runs"]]
    evals = sorted({r["eval_examples"] for r in runs})
    return {
        "protocol": "fewshot",
        "data": c.data,
        "model": c.train.model,
        "weights": c.train.weights,
        "classes": probe.classes,
        "eval_split": probe.eval_name,
        "eval_examples": evals[0] if len(evals) == 1 else evals,
        "seeds": c.seeds,
        "statistic": "top-1 over seeds: median (the paper's), mean, min, max",
        "shots": {str(k): v for k, v in per_k.items()},
        "wall_time_s": seconds,
        "train_time_s": sum(r["wall_time_s"] for r in runs),  # of every run, reused ones too
        "runs_reused": sum(r["reused"] for r in runs),
    }


def _table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["shots/class", "runs", "median top-1 %", "mean %", "min %", "max %"]
    rows = [[k, str(len(v["runs"])), percent(v["median"]), percent(v["mean"]), percent(v["min"]), percent(v["max"])]
            for k, v in results["shots"].items()]
    return header, rows


def _write_outputs(out: Path, c: FewShotConfig, results: dict[str, Any]) -> None:
    save_json(out / "results.json", results)
    weights = f", weights {c.train.weights}" if c.train.weights else ""
    md = [f"# Few-shot fine-tuning: {c.train.model}{weights}", "",
          f"Data: `{c.data}` ({len(results['classes'])} classes), scored on {results['eval_examples']} "
          f"{_SPLIT_WORDS[results['eval_split']]} images. {c.seeds} seed{'s' * (c.seeds != 1)} per K; each run "
          "is a BiT-HyperRule fine-tune (`k<K>/seed<S>/`). Top-1 accuracy in percent; the median is the paper's "
          "statistic.", "",
          markdown_table(*_table(results)), "",
          time_note(results, len(c.shots) * c.seeds), ""]
    write_text(out / "results.md", "\n".join(md))
    points = [(int(k), v["median"], v["min"], v["max"]) for k, v in results["shots"].items()]
    ks = [p[0] for p in points]
    error_bar_plot(out / "accuracy_vs_shots.png", {"top-1: median over seeds, bars min-max": points},
                   f"Few-shot fine-tuning of {c.train.model}: median top-1 over {c.seeds} seeds, bars min to max",
                   "examples per class", "top-1 accuracy", log_x=max(ks) >= 10 * min(ks),
                   hlines={"chance": 1.0 / len(results["classes"])})
