#!/usr/bin/env bash
# Start the master: ./start_master.sh [--config flq_config.json] [flq master flags...]
set -euo pipefail
cd "$(dirname "$0")"
PY=$(bash scripts/bootstrap.sh)
bash scripts/find_dataset.sh "$PY"
args=("$@")
case " $* " in *" --config "*) ;; *) args=(--config flq_config.json "${args[@]}") ;; esac
exec "$PY" -m flq master "${args[@]}"
