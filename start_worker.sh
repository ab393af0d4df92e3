#!/usr/bin/env bash
# Start a worker: ./start_worker.sh --worker_id N [--master_ip IP] [--master_port 5000] [flq worker flags...]
# Flags take their value as the next word or after '=': --worker_id 3 and --worker_id=3 alike.
set -euo pipefail
cd "$(dirname "$0")"
has_id=0
for a in "$@"; do
  case $a in --worker_id | --worker_id=?*) has_id=1 ;; -h | --help) has_id=1 ;; esac
done
if [ $has_id = 0 ]; then
  echo "usage: $0 --worker_id N [--master_ip IP] [--master_port 5000] [flq worker flags...]" >&2
  exit 2
fi
PY=$(bash scripts/bootstrap.sh)
bash scripts/find_dataset.sh "$PY"
exec "$PY" -m flq worker "$@"
