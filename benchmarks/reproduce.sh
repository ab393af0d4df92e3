#!/usr/bin/env bash
# Reproduce the published FLQ comparison on Fashion-MNIST (docs/algorithm.md, Defaults):
# fedavg (b_down 32), laq8 (b_down 32), bbit (b_up 4, b_down 8), bin (b_down 8),
# 20 workers, non-IID Dirichlet 0.1, 17e6-bit uplink budget, 800 rounds.
#
#   bash benchmarks/reproduce.sh                 # all four, 800 rounds
#   ROUNDS=100 EVAL_EVERY=5 bash benchmarks/reproduce.sh
#   MODES="bbit bin" bash benchmarks/reproduce.sh
#
# EVAL_EVERY (default 10) only thins the test-set evaluation; training is the
# same whatever it is. Writes results/reproduce/*.xlsx, the comparison plots
# in results/reproduce/plots, and prints final accuracy, cross-entropy and
# wall time per run.
set -euo pipefail
cd "$(dirname "$0")/.."
FLQ=${FLQ:-$( [ -x .venv/bin/flq ] && echo .venv/bin/flq || echo flq )}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
ROUNDS=${ROUNDS:-800}
EVAL_EVERY=${EVAL_EVERY:-10}
MODES=${MODES:-"fedavg laq8 bbit bin"}
OUT=${OUT:-results/reproduce}
mkdir -p "$OUT"
summary="$OUT/summary.tsv"
printf 'mode\tb_up\tb_down\trounds\tfinal_acc\tfinal_entropy\tmean_selected\twall_s\tresults\n' > "$summary"

for mode in $MODES; do
  case $mode in
    fedavg|laq8) bits=(--b_down 32) ;;
    bbit)        bits=(--b_up 4 --b_down 8) ;;
    bin)         bits=(--b_down 8) ;;
    *) echo "unknown mode $mode" >&2; exit 2 ;;
  esac
  echo "== $mode ${bits[*]}: $ROUNDS rounds"
  start=$(date +%s)
  "$FLQ" simulate --config configs/paper_fmnist.json --mode "$mode" "${bits[@]}" \
      --rounds "$ROUNDS" --eval_every "$EVAL_EVERY" --results_dir "$OUT" --no-progress | tee "$OUT/$mode.out"
  wall=$(( $(date +%s) - start ))
  xlsx=$(sed -n 's/^results: //p' "$OUT/$mode.out")
  "$PY" - "$xlsx" "$mode" "$wall" >> "$summary" <<'PYEOF'
import sys
from flq.results import read_results
path, mode, wall = sys.argv[1], sys.argv[2], sys.argv[3]
r = read_results(path)
c = r.curve.dropna(subset=["acc"])
last = c.iloc[-1]
print(f"{mode}\t{r.config.get('flq_algorithm.b_up')}\t{r.config.get('flq_algorithm.b_down')}\t{int(last['iter'])}\t"
      f"{last['acc']:.4f}\t{last['entropy']:.4f}\t{r.curve['selcnt'].mean():.2f}\t{wall}\t{path}")
PYEOF
done

"$FLQ" plot "$OUT"/flq_results_*.xlsx --out "$OUT/plots" >/dev/null
column -t -s $'\t' "$summary"
echo "plots: $OUT/plots"
