#!/usr/bin/env bash
# The whole GPU job in one command, for a fresh GPU machine with torch+CUDA and triton already installed
# (no network): build qbert with its CUDA sources, run the tests with QBERT_STRICT=1 (a fallback to the
# PyTorch reference on the GPU is then an error), run every benchmark, and write the results to
# benchmarks/results/ (and to $OUT when set, so a remote run can bring them back).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
results=benchmarks/results
log_dir=${OUT:-$results}
mkdir -p "$results" "$log_dir"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$log_dir/gpu.txt"
QBERT_FORCE_CUDA=1 pip install --no-build-isolation --no-deps -e . 2>&1 | tail -n 3
qbert info | tee -a "$log_dir/gpu.txt"

status=0
QBERT_STRICT=1 python -m pytest -q -p no:cacheprovider 2>&1 | tee "$log_dir/pytest-gpu.log" \
  || status=$?

qbert bench all --out "$results" 2>&1 | tee "$log_dir/bench.log" || status=$?
if [ -n "${OUT:-}" ]; then
  shopt -s nullglob
  written=("$results"/"$(date -u +%Y-%m-%d)"-*)
  [ ${#written[@]} -gt 0 ] && cp "${written[@]}" "$OUT"/
fi
exit "$status"
