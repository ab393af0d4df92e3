#!/usr/bin/env bash
# Master and total_workers workers on this host over loopback; waits for the
# end and prints where the results and logs are.
#
#   ./quick_test.sh                       # flq_config.json: 4 workers, bbit 4/8, 20 rounds
#   ROUNDS=50 PORT=5001 ./quick_test.sh --mode bin     # extra flags go to the master
#
# While it runs: curl http://127.0.0.1:$PORT/status ; curl -X POST http://127.0.0.1:$PORT/stop
#
# Ctrl-C (SIGINT), SIGTERM or a hang-up stop the run: the master gets the
# signal once (SIGINT as SIGINT, the others as SIGTERM), finishes or abandons
# the current round, writes the results and tells the workers to exit; this
# script waits for all of them, prints "stopped by Ctrl-C after round N;
# results: PATH" and exits with the master's status (README "How a run ends":
# 130 for Ctrl-C, 143 for SIGTERM, 0 completed, 4 POST /stop ...). A second
# Ctrl-C makes the master exit at once (it still writes its results). The
# master and the workers run in process groups of their own, so the
# terminal's Ctrl-C reaches them only through this script, once.
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
out=logs/quick_test_master.out

master="" pids=() got="" trapped=0
# stop SIGNAL: pass the stop on to the master (each time: a second Ctrl-C
# exits it at once); once it is gone, to the workers still running.
stop() {
  trapped=1
  [ -n "$got" ] || got=$1
  [ -n "$master" ] || return 0   # it is being started: passed on as soon as its pid is known
  if kill -0 "$master" 2>/dev/null; then
    kill -s "$([ "$1" = INT ] && echo INT || echo TERM)" "$master" 2>/dev/null || true
  elif [ ${#pids[@]} -gt 0 ]; then
    kill -TERM "${pids[@]}" 2>/dev/null || true
  fi
}
describe() { case $1 in INT) echo Ctrl-C ;; *) echo "SIG$1" ;; esac; }
trap 'stop INT' INT
trap 'stop TERM' TERM
trap 'stop HUP' HUP

# Job control only while starting them: each child gets a process group of its
# own and SIGINT not ignored (without it bash starts background commands with
# SIGINT ignored, and the master could only be stopped with SIGTERM).
set -m
"$PY" -m flq master --config "$CONFIG" --host 127.0.0.1 --port "$PORT" --rounds "$ROUNDS" --threads "$THREADS" \
  ${WORKERS:+--workers "$WORKERS"} "$@" < /dev/null > "$out" 2>&1 &
master=$!
set +m
[ -z "$got" ] || stop "$got"   # a signal that came while it started

answers() {   # the master's /status answers (curl, else Python)
  if command -v curl >/dev/null 2>&1; then curl -fsS --max-time 5 "http://127.0.0.1:$PORT/status" >/dev/null 2>&1
  else "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "http://127.0.0.1:$PORT/status" >/dev/null 2>&1; fi
}
up=0
for _ in $(seq 1 1000); do   # wait until the master answers (start-up: up to 5 minutes on a busy machine)
  [ -z "$got" ] || break
  kill -0 "$master" 2>/dev/null || break
  answers && { up=1; break; }
  sleep 0.3 || true   # a Ctrl-C to the whole group ends the sleep too
done
if [ $up = 1 ] && [ -z "$got" ]; then
  echo "master pid $master on http://127.0.0.1:$PORT ($workers workers, $ROUNDS rounds)"
  set -m
  for i in $(seq 0 $((workers - 1))); do
    "$PY" -m flq worker --worker_id "$i" --master_ip 127.0.0.1 --master_port "$PORT" --threads "$THREADS" \
      < /dev/null > "logs/quick_test_worker$i.out" 2>&1 &
    pids+=($!)
  done
  set +m
  echo "worker pids ${pids[*]}"
  [ -z "$got" ] || stop "$got"
elif [ $up = 0 ] && [ -z "$got" ] && kill -0 "$master" 2>/dev/null; then
  echo "the master did not answer http://127.0.0.1:$PORT/status; stopping it" >&2
  kill -TERM "$master" 2>/dev/null || true
fi

# Wait for the master. A trapped signal makes `wait` return at once (status
# > 128) while the master still runs: wait again, for its own status.
while :; do
  trapped=0
  wait "$master" && rc=0 || rc=$?
  [ $trapped = 1 ] || break
  kill -0 "$master" 2>/dev/null && continue   # interrupted; the master still runs
  wait "$master" 2>/dev/null && r=0 || r=$?     # it ended meanwhile: its own status (127: rc was already its)
  [ "$r" = 127 ] || rc=$r
  break
done
for _ in $(seq 1 60); do   # the workers exit once the master tells them; 30 s at most
  alive=0
  for p in "${pids[@]+"${pids[@]}"}"; do kill -0 "$p" 2>/dev/null && alive=1; done
  [ $alive = 0 ] && break
  sleep 0.5 || true
done
if [ ${#pids[@]} -gt 0 ]; then
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
fi

results=$(sed -n 's/^results: //p' "$out" | tail -n 1)
rounds=$(grep -oE 'run ended \([a-z_]+\) after [0-9]+ rounds' "$out" | tail -n 1 | grep -oE '[0-9]+ rounds' | grep -oE '[0-9]+' || true)
if [ -n "$got" ]; then
  how="stopped by $(describe "$got")"
  if [ -n "$results" ]; then echo "$how after round ${rounds:-?}; results: $results"
  elif [ "$rc" = 6 ]; then echo "$how; the results could not be written (see $out)"
  else echo "$how before any round finished: no results written"; fi
elif [ -n "$results" ]; then
  echo "results: $results"
else
  echo "no results written (master exit $rc; its output: $out)"
  tail -n 5 "$out" >&2 || true
fi
[ "$rc" = 0 ] || echo "master exit status $rc (README: How a run ends)"
log=$(sed -n 's/.* INFO flq.cli: log file //p' "$out" | head -n 1)
echo "logs: ${log:-$out} and logs/quick_test_worker*.out"
exit "$rc"
