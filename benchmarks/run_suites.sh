#!/usr/bin/env bash
# Run benchmark suites on this machine: each suite by WORKERS processes side by side (1 torch thread
# each) that share its runs (each claims the next run; a final waits for its grid), then one pass
# without --worker for the runs that time steps and epochs (alone on the machine), then re-render
# the report. Resumable: run it again and finished runs are skipped; a killed run resumes from its
# checkpoint.
#
#   benchmarks/run_suites.sh [SUITE...]      (default: all five; PRESET=full WORKERS=2; OUT: the preset's own
#                                             results folder, as knnsolver bench chooses: one preset per folder)
#   nohup benchmarks/run_suites.sh classification unseen-classes > benchmarks/logs/run.log 2>&1 &
set -uo pipefail
KNN=${KNN:-.venv/bin/knnsolver}
PRESET=${PRESET:-full}
WORKERS=${WORKERS:-2}
OUT_FLAG=${OUT:+--out $OUT}
SUITES=${*:-classification scarcity unseen-classes cost ablation}
export OMP_NUM_THREADS=1
mkdir -p benchmarks/logs
for suite in $SUITES; do
  for i in $(seq 0 $((WORKERS - 1))); do
    "$KNN" bench "$suite" --preset "$PRESET" $OUT_FLAG --worker > "benchmarks/logs/$suite.$i.log" 2>&1 &
  done
  wait
  "$KNN" bench "$suite" --preset "$PRESET" $OUT_FLAG > "benchmarks/logs/$suite.log" 2>&1 || echo "$suite: final pass failed, see benchmarks/logs/$suite.log"
done
if [ -n "${OUT:-}" ]; then  # a report of its own, beside those results
  "$KNN" bench report --results "$OUT" --output "$OUT/BENCHMARKS.md" --plots "$OUT/plots"
else
  "$KNN" bench report
fi
