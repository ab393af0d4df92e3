#!/usr/bin/env bash
# README's test command. Bootstrap (venv, PyTorch, the project, Fashion-MNIST
# where apt allows), then what the tests need from the system
# (scripts/test_deps.sh: sshd, ssh, rsync, curl, openssl, installed with
# apt-get as root or with passwordless sudo, else one line naming what is
# missing and which tests will skip), then lint, format and types (ruff, mypy;
# settings in pyproject.toml), then the test suite in 2 processes
# (pytest-xdist; each test file stays in one: its processes, ports and
# fixtures are its own). Every skipped test is listed with its reason at the end.
#
#   ./run_tests.sh              # everything: what CI (.ci/run) runs, about 12 min on 2 cores
#   ./run_tests.sh --quick      # for development: lint, types and the tests not marked
#                               # slow (-m "not slow": no real clusters, no long training)
#   ./run_tests.sh -k cluster   # other arguments go to pytest (-n 0: all in this process)
#
# A test that starts real master or worker processes, or trains many rounds on
# Fashion-MNIST, is marked @pytest.mark.slow (marker in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")"
quick=0 args=()
for a in "$@"; do
  if [ "$a" = --quick ]; then quick=1; else args+=("$a"); fi
done
PY=$(bash scripts/bootstrap.sh)
bash scripts/find_dataset.sh "$PY"
bash scripts/test_deps.sh "$PY"
"$PY" -m ruff check --quiet . || { echo "run_tests.sh: ruff check failed (fix, or 'ruff check --fix')" >&2; exit 1; }
"$PY" -m ruff format --check --quiet . || { echo "run_tests.sh: not formatted (run 'ruff format')" >&2; exit 1; }
"$PY" -m mypy || { echo "run_tests.sh: mypy found type errors" >&2; exit 1; }
[ $quick = 0 ] || args=(-m "not slow" "${args[@]+"${args[@]}"}")
exec "$PY" -m pytest -q -n 2 --dist loadfile "${args[@]+"${args[@]}"}"
