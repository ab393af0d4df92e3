#!/usr/bin/env bash
# Bootstrap (venv, PyTorch, the project, Fashion-MNIST where apt allows), then
# run the whole test suite. Extra arguments go to pytest (e.g. -k cluster).
set -euo pipefail
cd "$(dirname "$0")"
PY=$(bash scripts/bootstrap.sh)
bash scripts/find_dataset.sh "$PY"
exec "$PY" -m pytest -q "$@"
