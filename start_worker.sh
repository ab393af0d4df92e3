#!/usr/bin/env bash
# Start a worker: ./start_worker.sh --worker_id N --master_ip IP [--master_port 5000] [flq worker flags...]
set -euo pipefail
cd "$(dirname "$0")"
case " $* " in *" --worker_id "*) ;; *) echo "usage: $0 --worker_id N --master_ip IP [--master_port 5000]" >&2; exit 2 ;; esac
PY=$(bash scripts/bootstrap.sh)
bash scripts/find_dataset.sh "$PY"
exec "$PY" -m flq worker "$@"
