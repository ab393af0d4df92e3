#!/usr/bin/env bash
# Bootstrap (venv, PyTorch, the project, Fashion-MNIST where apt allows), then
# check lint, format and types (ruff, mypy; settings in pyproject.toml), then
# run the whole test suite in 2 processes (pytest-xdist; each test file stays in
# one: its processes, ports and fixtures are its own). Extra arguments go to
# pytest (e.g. -k cluster; -n 0 runs everything in this process).
set -euo pipefail
cd "$(dirname "$0")"
PY=$(bash scripts/bootstrap.sh)
bash scripts/find_dataset.sh "$PY"
"$PY" -m ruff check --quiet . || { echo "run_tests.sh: ruff check failed (fix, or 'ruff check --fix')" >&2; exit 1; }
"$PY" -m ruff format --check --quiet . || { echo "run_tests.sh: not formatted (run 'ruff format')" >&2; exit 1; }
"$PY" -m mypy || { echo "run_tests.sh: mypy found type errors" >&2; exit 1; }
exec "$PY" -m pytest -q -n 2 --dist loadfile "$@"
