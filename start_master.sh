#!/usr/bin/env bash
# Start the master: ./start_master.sh [--config flq_config.json] [flq master flags...]
# Flags take their value as the next word or after '=': --config c.json and --config=c.json alike.
set -euo pipefail
cd "$(dirname "$0")"
PY=$(bash scripts/bootstrap.sh)
bash scripts/find_dataset.sh "$PY"
args=("$@")
has_config=0
for a in "$@"; do
  case $a in --config | --config=*) has_config=1 ;; esac
done
[ $has_config = 1 ] || args=(--config flq_config.json "${args[@]}")
exec "$PY" -m flq master "${args[@]}"
