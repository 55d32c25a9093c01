#!/usr/bin/env bash
# `make gpu-check`: on a GPU machine with python3 + torch (+ transformers, timm) and bigtransfer NOT installed:
# preflight, the CUDA tests (pytest -m cuda, time-boxed), then the GPU benchmark (time-boxed); all under 10 minutes.
# Results: benchmarks/RESULTS-gpu.md, benchmarks/logs/gpu-*.jsonl (benchmark rows), benchmarks/logs/gpu-check-*.log
# (everything printed). WHEELS=DIR installs missing packages from wheel files in DIR (no index) into .gpu-deps/.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Budgets: tests 210 s + benchmark 270 s (+60 s for the part running at its end) + preflight: under 10 minutes.
TESTS_S=${GPU_TESTS_S:-210}
BENCH_S=${GPU_BENCH_S:-270}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p benchmarks/logs
stamp=$(date -u +%Y%m%d-%H%M%S)
log=benchmarks/logs/gpu-check-$stamp.log
{
  if [ -n "${WHEELS:-}" ]; then
    echo "== installing the wheels in $WHEELS into .gpu-deps"
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" --target .gpu-deps "$WHEELS"/*.whl \
      || echo "wheel install failed; going on with what is there"
    export PYTHONPATH="$PYTHONPATH:$PWD/.gpu-deps"
  fi
  echo "== preflight"
  "$PY" tools/gpu_preflight.py
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  echo "== CUDA tests (at most ${TESTS_S} s)"
  if "$PY" -c "import pytest" 2>/dev/null; then
    timeout -k 10 "$TESTS_S" "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider --durations 8
    rc=$?
    [ $rc -eq 124 ] && echo "CUDA tests: stopped at the ${TESTS_S} s limit"
    echo "CUDA tests exit status: $rc"
  else
    echo "CUDA tests: SKIPPED, pytest is not installed (WHEELS=DIR with a pytest wheel installs it)"
  fi
  echo "== GPU benchmark (budget ${BENCH_S} s, stopped at $((BENCH_S + 60)) s)"
  timeout -k 10 $((BENCH_S + 60)) "$PY" benchmarks/bench_gpu.py --budget-s "$BENCH_S" \
    --log "benchmarks/logs/gpu-$stamp.jsonl"
  echo "benchmark exit status: $?"
} 2>&1 | tee "$log"
echo "log: $log"
# On a lent device machine, $OUT is the folder whose files come back: leave the results there too.
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  cp benchmarks/RESULTS-gpu.md "$log" "benchmarks/logs/gpu-$stamp.jsonl" "$OUT"/ 2>/dev/null
  echo "copied the results to $OUT"
fi
