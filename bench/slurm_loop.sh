#!/usr/bin/env bash
# Run the real-Slurm launch tests (tests/test_launch_slurm.py: a single-node cluster started by
# tests/slurm_cluster.sh, needs root) N times in a row and print how many runs passed.
#
#   bench/slurm_loop.sh [N=10]        # ALFRED_INSTALL_SLURM=1 lets the fixture apt-get Slurm
#
# Each run's pytest output goes to $LOG_DIR/slurm_loop.<i>.log (default /tmp). Exit 0 only if all passed.
set -uo pipefail
n=${1:-10}
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
log_dir=${LOG_DIR:-/tmp}
passed=0
for i in $(seq "$n"); do
  start=$SECONDS
  log="$log_dir/slurm_loop.$i.log"
  if ALFRED_INSTALL_SLURM=${ALFRED_INSTALL_SLURM:-1} timeout 1500 "$py" -m pytest -q -p no:cacheprovider \
      tests/test_launch_slurm.py >"$log" 2>&1; then
    passed=$((passed + 1))
    echo "run $i/$n: passed ($((SECONDS - start)) s)"
  else
    echo "run $i/$n: FAILED ($((SECONDS - start)) s): $(grep -m1 -E '^(E |FAILED)' "$log")  [$log]"
  fi
done
echo "slurm loop: $passed/$n runs passed"
[ "$passed" -eq "$n" ]
