#!/usr/bin/env bash
# Fuzz the master's HTTP API from its OpenAPI document with schemathesis:
# every generated request must get a non-5xx answer.
#
#   bash benchmarks/fuzz_api.sh [MAX_EXAMPLES]      # default 40 per operation
#
# schemathesis lives in its own venv (.venv-fuzz) so it never touches the
# project's. The master runs with a bearer token the fuzzer sends, so the
# requests reach the handlers instead of stopping at the 401 check.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/bootstrap.sh)
[ -x .venv-fuzz/bin/st ] || { python3 -m venv .venv-fuzz && .venv-fuzz/bin/pip install -q 'schemathesis>=4,<5'; }
port=${PORT:-5189}
work=$(mktemp -d)
"$PY" -m flq master --config flq_config.json --host 127.0.0.1 --port "$port" --threads 1 --eval_every 1000 \
  --auth_token fuzz-token --results_dir "$work/results" --log_dir "$work/logs" --checkpoint_dir "$work/ck" \
  > "$work/master.out" 2>&1 &
master=$!
trap 'kill $master 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$port/status" >/dev/null 2>&1 && break; sleep 0.3; done
.venv-fuzz/bin/st run "http://127.0.0.1:$port/openapi.json" -H "Authorization: Bearer fuzz-token" \
  -c not_a_server_error -n "${1:-40}" --request-timeout 8
