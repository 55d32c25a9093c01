"""The GPU benchmark's CPU side: it refuses clearly without CUDA, its --tiny smoke run goes through every eager
code path and writes its tables and log, and a failing candidate is reported instead of ending the run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the benchmark's HF peer")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gpu  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refuses_without_cuda_and_without_tiny(capsys):
    assert bench_gpu.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert bench_gpu.main(["--device", "cpu"]) == 2
    assert "only with --tiny" in capsys.readouterr().err


def test_tiny_cpu_smoke_run_writes_tables_and_log(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_gpu, "MODES", ("fp32", "bf16"))
    out, log = tmp_path / "RESULTS-gpu.md", tmp_path / "gpu.jsonl"
    # No time budget: on a slow machine the benchmark would skip parts that this test expects.
    assert bench_gpu.main(["--device", "cpu", "--tiny", "--out", str(out), "--log", str(log), "--budget-s", "1e9"]) == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    seen = {(r["part"], r["mode"], r["candidate"]) for r in rows}
    assert {("infer", "fp32", "ours"), ("infer", "bf16", "hf"), ("train", "bf16", "ours"), ("train", "bf16", "hf")} <= seen
    assert all(r["error"] is None and r["images_per_s"] > 0 for r in rows)
    assert {r["batch"] for r in rows if r["part"] == "train"} == {4}  # the largest of the tiny plan's (2, 4)
    text = out.read_text()
    assert "Device: **CPU**" in text and "| R14x0.5 | 32 | 2 | fp32 | ours |" in text
    assert "train R14x0.5 32px b4 bf16: ours" in text  # the ratio line
    assert "max |hf - ours| / max |ours|" in text


def test_a_failing_candidate_is_recorded_not_fatal():
    def broken():
        raise RuntimeError("CUDA out of memory while building\nsecond line")

    row = bench_gpu.measure(bench_gpu.Row("train", "R50x1", 128, 8, "bf16", "hf-compile"), broken,
                            torch.device("cpu"), 0.0, 1.0, None)
    assert row.images_per_s is None and row.error == "RuntimeError: CUDA out of memory while building"
    assert bench_gpu.ratios([row]) == []


def test_ratio_lines_take_our_best_candidate_against_the_faster_peer():
    def row(candidate: str, ips: float) -> bench_gpu.Row:
        return bench_gpu.Row("train", "R50x1", 128, 256, "bf16", candidate, images_per_s=ips)

    lines = bench_gpu.ratios([row("ours", 100.0), row("ours-compile", 130.0), row("hf", 50.0), row("timm", 80.0),
                              row("timm-compile", 90.0)])
    assert lines == ["- train R50x1 128px b256 bf16: ours-compile 130.0 img/s / timm-compile 90.0 = **1.44x** "
                     "(target 1.3x: met)"]
