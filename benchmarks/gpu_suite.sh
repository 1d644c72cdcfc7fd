#!/usr/bin/env bash
# The whole GPU job in one command, for a fresh GPU machine with torch+CUDA and triton already installed
# (no network): build qbert with its CUDA sources, run the tests with QBERT_STRICT=1 (a fallback to the
# PyTorch reference on the GPU is then an error; the compute-sanitizer tests run here too), run every
# benchmark suite of `qbert bench all`, and write the results to benchmarks/results/. When $OUT is set
# (a remote run), the logs and one archive of the day's results are copied there, few files to bring back.
# Each suite runs on its own, so a crash in one still leaves the others' results.
#
# A lease may cap one command's time (10 minutes on the shared H100s), so the job also runs in steps,
# each in its own call on the same machine:
#   benchmarks/gpu_suite.sh build | test | bench [SUITE ...] | all (default)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
results=benchmarks/results
log_dir=${OUT:-$results}
mkdir -p "$results" "$log_dir"
today=$(date +%Y-%m-%d)  # local date, as the reports' file names use

step=${1:-all}
[ $# -gt 0 ] && shift
status=0

if [ "$step" = build ] || [ "$step" = all ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$log_dir/gpu.txt"
  # MAX_JOBS: the CUDA sources compile in parallel (ninja), one job per core.
  MAX_JOBS=$(nproc) QBERT_FORCE_CUDA=1 pip install --no-build-isolation --no-deps -e . 2>&1 | tail -n 3
  qbert info | tee -a "$log_dir/gpu.txt"
fi

if [ "$step" = test ] || [ "$step" = all ]; then
  QBERT_STRICT=1 python -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee "$log_dir/pytest-gpu.log" \
    || status=$?
fi

if [ "$step" = bench ] || [ "$step" = all ]; then
  if [ "$step" = bench ] && [ $# -gt 0 ]; then suites="$*"
  else suites=$(python -c "from qbert.benchmarks import SUITES; print(' '.join(SUITES))"); fi
  touch "$log_dir/bench.log"
  for suite in $suites; do
    start=$SECONDS
    qbert bench "$suite" --out "$results" 2>&1 | tee -a "$log_dir/bench.log" || status=$?
    echo "bench $suite: $((SECONDS - start)) s" | tee -a "$log_dir/bench.log"
  done
fi

if [ -n "${OUT:-}" ]; then
  shopt -s nullglob
  written=("$results"/"$today"-*)
  [ ${#written[@]} -gt 0 ] && tar -czf "$OUT/results-$today.tar.gz" "${written[@]}"
fi
exit "$status"
