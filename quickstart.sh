#!/usr/bin/env bash
# The main job: bootstrap, then a short FLQ training on real Fashion-MNIST with
# the original experiment's settings (20 workers, non-IID Dirichlet 0.1,
# 17e6-bit budget), bbit with 4-bit uplink and 8-bit downlink, both entropy-coded
# (the product's default; configs/paper_fmnist.json alone sends them uncoded, as
# the original did, so the budget hears 9 workers instead of all 20), 30 rounds;
# writes results/flq_results_*.xlsx and its plots in results/plots.
#
#   ./quickstart.sh                 # extra flags go to `flq simulate`, e.g. --rounds 100 --mode bin
set -euo pipefail
cd "$(dirname "$0")"
PY=$(bash scripts/bootstrap.sh)
bash scripts/find_dataset.sh "$PY"
exec "$PY" -m flq simulate --config configs/paper_fmnist.json --mode bbit --b_up 4 --b_down 8 --rounds 30 \
  --entropy_coding both --plot "$@"
