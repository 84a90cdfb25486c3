#!/usr/bin/env bash
# Run benchmark suites on this machine: each suite as SHARDS processes side by side (1 torch thread
# each; methods split round-robin), then one unsharded pass for the runs that choose across methods,
# the runs that time steps and epochs (alone on the machine) and anything a shard left, then
# re-render the report. Resumable: run it again and finished runs are skipped.
#
#   benchmarks/run_suites.sh [SUITE...]      (default: all five; PRESET=full SHARDS=2)
#   nohup benchmarks/run_suites.sh classification unseen-classes > benchmarks/logs/run.log 2>&1 &
set -uo pipefail
KNN=${KNN:-.venv/bin/knnsolver}
PRESET=${PRESET:-full}
SHARDS=${SHARDS:-2}
SUITES=${*:-classification scarcity unseen-classes cost ablation}
export OMP_NUM_THREADS=1
mkdir -p benchmarks/logs
for suite in $SUITES; do
  for i in $(seq 0 $((SHARDS - 1))); do
    "$KNN" bench "$suite" --preset "$PRESET" --shard "$i/$SHARDS" > "benchmarks/logs/$suite.$i.log" 2>&1 &
  done
  wait
  "$KNN" bench "$suite" --preset "$PRESET" > "benchmarks/logs/$suite.log" 2>&1 || echo "$suite: unsharded pass failed, see benchmarks/logs/$suite.log"
done
"$KNN" bench report
