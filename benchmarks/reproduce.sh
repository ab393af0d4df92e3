#!/usr/bin/env bash
# Reproduce the published FLQ comparison on Fashion-MNIST: the sweep
# benchmarks/reproduce.json (fedavg and laq8 with b_down 32, bbit 4/8, bin
# with b_down 8; 20 workers, non-IID Dirichlet 0.1, 17e6-bit uplink budget,
# 800 rounds), then its table and figures.
#
#   bash benchmarks/reproduce.sh                          # all four, 800 rounds
#   JOBS=2 THREADS=1 bash benchmarks/reproduce.sh         # two at a time, one thread each (what README's table used)
#   ROUNDS=100 EVAL_EVERY=5 MODES="bbit bin" bash benchmarks/reproduce.sh
#   BACKEND=ray bash benchmarks/reproduce.sh              # each run a Ray task (flq sweep --backend)
#
# EVAL_EVERY (default 10) only thins the test-set evaluation; training is the
# same whatever it is. Writes $OUT (default results/reproduce): the sweep's
# folder per run (spreadsheet, log, model), summary.csv/.xlsx, walls.txt
# (each run's exit status and wall seconds); then
# benchmarks/reproduction_report.py draws the comparison figures and writes
# results.md (the table README.md shows) there and prints the table. A second
# call skips the runs already done (flq sweep).
# README's copy lives in docs/reproduction: copy the spreadsheets there and run
#   .venv/bin/python benchmarks/reproduction_report.py docs/reproduction/*.xlsx \
#       --walls docs/reproduction/walls.txt --machine "..."
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-results/reproduce}
mkdir -p "$OUT"
# the sweep file with this call's rounds, evaluation and modes
ROUNDS=${ROUNDS:-800} EVAL_EVERY=${EVAL_EVERY:-10} MODES=${MODES:-"fedavg laq8 bbit bin"} "$PY" - "$OUT/sweep.json" <<'PYEOF'
import json, os, sys
spec = json.load(open("benchmarks/reproduce.json"))
spec["config"] = os.path.abspath("configs/paper_fmnist.json")
spec.pop("out")
spec["set"].update(max_rounds=int(os.environ["ROUNDS"]), eval_every=int(os.environ["EVAL_EVERY"]))
modes = os.environ["MODES"].split()
known = [v["name"] for v in spec["grid"]["variant"]]
for m in modes:
    if m not in known:
        sys.exit(f"reproduce.sh: unknown mode {m!r} in MODES (expected {' '.join(known)})")
spec["grid"]["variant"] = [v for v in spec["grid"]["variant"] if v["name"] in modes]
json.dump(spec, open(sys.argv[1], "w"), indent=2)
PYEOF
rc=0
"$PY" -m flq sweep "$OUT/sweep.json" --out "$OUT" --backend "${BACKEND:-local}" --parallel "${JOBS:-1}" \
    --threads "${THREADS:-0}" || rc=$?
# walls.txt for the report: "<mode> rc=<status> wall=<seconds>" per run, from the sweep's summary
"$PY" - "$OUT" <<'PYEOF'
import csv, math, sys
out = sys.argv[1]
with open(f"{out}/summary.csv") as f, open(f"{out}/walls.txt", "w") as w:
    for row in csv.DictReader(f):
        wall = float(row["wall_s"] or "nan")
        rc = 0 if row["status"] != "failed" else 1
        if not math.isnan(wall):
            w.write(f"{row['run']} rc={rc} wall={wall:.0f}\n")
PYEOF
sheets=()
while IFS= read -r sheet; do [ -n "$sheet" ] && sheets+=("$sheet"); done < <(
  "$PY" -c 'import csv,sys; [print(r["results"]) for r in csv.DictReader(open(sys.argv[1])) if r["status"] != "failed" and r["results"]]' "$OUT/summary.csv")
[ ${#sheets[@]} -gt 0 ] && "$PY" benchmarks/reproduction_report.py "${sheets[@]}" --out "$OUT" --walls "$OUT/walls.txt" --print
echo "figures and table: $OUT"
exit $rc
