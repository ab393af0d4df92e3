#!/usr/bin/env bash
# Master and total_workers workers on this host over loopback; waits for the
# end and prints where the results and logs are.
#
#   ./quick_test.sh                       # flq_config.json: 4 workers, bbit 4/8, 20 rounds
#   ROUNDS=50 PORT=5001 ./quick_test.sh --mode bin     # extra flags go to the master
#
# While it runs: curl http://127.0.0.1:$PORT/status ; curl -X POST http://127.0.0.1:$PORT/stop
set -euo pipefail
cd "$(dirname "$0")"
PY=$(bash scripts/bootstrap.sh)
bash scripts/find_dataset.sh "$PY"
CONFIG=${CONFIG:-flq_config.json}
PORT=${PORT:-5000}
ROUNDS=${ROUNDS:-20}
THREADS=${THREADS:-1}
workers=${WORKERS:-$("$PY" -c "import sys; from flq.config import load_config; print(load_config(sys.argv[1]).total_workers)" "$CONFIG")}

mkdir -p logs
"$PY" -m flq master --config "$CONFIG" --host 127.0.0.1 --port "$PORT" --rounds "$ROUNDS" --threads "$THREADS" \
  ${WORKERS:+--workers "$WORKERS"} "$@" > logs/quick_test_master.out 2>&1 &
master=$!
pids=()
# Ctrl-C (or SIGTERM to this script): one SIGTERM to the master, which stops the
# run, writes the results and tells the workers to exit. The master and the
# workers run in the background with SIGINT ignored, so the terminal's Ctrl-C
# does not reach them a second time.
stop() { kill -TERM "$master" 2>/dev/null || true; }
trap stop INT TERM

for _ in $(seq 1 100); do   # wait until the master answers
  curl -fsS "http://127.0.0.1:$PORT/status" >/dev/null 2>&1 && break
  kill -0 "$master" 2>/dev/null || { cat logs/quick_test_master.out >&2; exit 1; }
  sleep 0.3
done
echo "master pid $master on http://127.0.0.1:$PORT ($workers workers, $ROUNDS rounds)"
for i in $(seq 0 $((workers - 1))); do
  "$PY" -m flq worker --worker_id "$i" --master_ip 127.0.0.1 --master_port "$PORT" --threads "$THREADS" \
    > "logs/quick_test_worker$i.out" 2>&1 &
  pids+=($!)
done
echo "worker pids ${pids[*]}"
rc=0
while :; do   # a trapped signal interrupts `wait`: wait again until the master has exited
  wait "$master" && rc=0 || rc=$?
  kill -0 "$master" 2>/dev/null || break
done
for _ in $(seq 1 60); do   # the workers exit once the master tells them; 30 s at most
  alive=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
  [ $alive = 0 ] && break
  sleep 0.5
done
kill -TERM "${pids[@]}" 2>/dev/null || true
for p in "${pids[@]}"; do wait "$p" || true; done
grep -h '^results:' logs/quick_test_master.out || echo "no results written (master exit $rc)"
[ $rc = 0 ] || echo "master exit status $rc (README: How a run ends)"
echo "logs: $(ls -t logs/master_*.log | head -1) and logs/worker*_*.log"
exit $rc
