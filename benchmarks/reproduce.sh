#!/usr/bin/env bash
# Reproduce the published FLQ comparison on Fashion-MNIST (docs/algorithm.md, Defaults):
# fedavg (b_down 32), laq8 (b_down 32), bbit (b_up 4, b_down 8), bin (b_down 8),
# 20 workers, non-IID Dirichlet 0.1, 17e6-bit uplink budget, 800 rounds.
#
#   bash benchmarks/reproduce.sh                          # all four, 800 rounds, one after the other
#   JOBS=2 THREADS=1 bash benchmarks/reproduce.sh         # two at a time, one thread each (what README's table used)
#   ROUNDS=100 EVAL_EVERY=5 MODES="bbit bin" bash benchmarks/reproduce.sh
#
# EVAL_EVERY (default 10) only thins the test-set evaluation; training is the
# same whatever it is. Writes $OUT (default results/reproduce): one spreadsheet
# per mode, walls.txt (each run's exit status and wall seconds), then
# benchmarks/reproduction_report.py draws the comparison figures and writes
# results.md (the table README.md shows) there and prints the table.
# README's copy lives in docs/reproduction: copy the spreadsheets there and run
#   .venv/bin/python benchmarks/reproduction_report.py docs/reproduction/*.xlsx \
#       --walls docs/reproduction/walls.txt --machine "..."
set -euo pipefail
cd "$(dirname "$0")/.."
FLQ=${FLQ:-$( [ -x .venv/bin/flq ] && echo .venv/bin/flq || echo flq )}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
ROUNDS=${ROUNDS:-800}
EVAL_EVERY=${EVAL_EVERY:-10}
MODES=${MODES:-"fedavg laq8 bbit bin"}
JOBS=${JOBS:-1}
THREADS=${THREADS:-0}
OUT=${OUT:-results/reproduce}
mkdir -p "$OUT"
: > "$OUT/walls.txt"

one() {  # one published run: its spreadsheet in $OUT, its wall time in walls.txt
  local mode=$1 bits
  case $mode in
    fedavg|laq8) bits=(--b_down 32) ;;
    bbit)        bits=(--b_up 4 --b_down 8) ;;
    bin)         bits=(--b_down 8) ;;
    *) echo "unknown mode $mode" >&2; return 2 ;;
  esac
  echo "== $mode ${bits[*]}: $ROUNDS rounds"
  local start rc=0
  start=$(date +%s)
  "$FLQ" simulate --config configs/paper_fmnist.json --mode "$mode" "${bits[@]}" --rounds "$ROUNDS" \
      --eval_every "$EVAL_EVERY" --threads "$THREADS" --results_dir "$OUT" --log_dir "$OUT/logs" --no-progress \
      > "$OUT/$mode.out" 2>&1 || rc=$?
  echo "$mode rc=$rc wall=$(( $(date +%s) - start ))" >> "$OUT/walls.txt"
  tail -n 4 "$OUT/$mode.out"
}

pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait; exit 130' INT TERM
for mode in $MODES; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  one "$mode" &
  pids+=($!)
done
wait
sheets=()  # this run's spreadsheets (an earlier run's in $OUT are left out)
for mode in $MODES; do
  sheet=$(sed -n 's/^results: //p' "$OUT/$mode.out")
  [ -n "$sheet" ] && sheets+=("$sheet")
done
"$PY" benchmarks/reproduction_report.py "${sheets[@]}" --out "$OUT" --walls "$OUT/walls.txt" --print
echo "figures and table: $OUT"
