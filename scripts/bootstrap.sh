#!/usr/bin/env bash
# Make a Python environment that can run FLQ-Fed and print its interpreter's path.
#
#   PY=$(bash scripts/bootstrap.sh)           # quiet; progress goes to stderr
#
# Order: $FLQ_PYTHON if set (e.g. a conda env's python on a Jetson); else the
# repo's .venv, created on first use with --system-site-packages so an
# existing PyTorch (NVIDIA's Jetson wheel, say) is reused. PyTorch is installed
# before the project so pip never pulls a multi-GB CUDA build on a CPU box:
# torch==2.13.0 where that build is available, else the newest in range.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
say() { printf '[bootstrap] %s\n' "$*" >&2; }

if [ -n "${FLQ_PYTHON:-}" ]; then
  py=$FLQ_PYTHON
else
  py=$root/.venv/bin/python
  if [ ! -x "$py" ]; then
    base=$(command -v python3 || command -v python)
    say "creating $root/.venv with $($base --version 2>&1)"
    "$base" -m venv --system-site-packages "$root/.venv"
    "$py" -m pip install -q --upgrade pip >&2 2>/dev/null || true
  fi
fi

if ! "$py" -c 'import torch' >/dev/null 2>&1; then
  say "installing PyTorch (CPU build)"
  "$py" -m pip install -q torch==2.13.0 >&2 || "$py" -m pip install -q 'torch>=2.0,<3' >&2
fi
stale=0   # our own .venv: reinstall when pyproject.toml changed since the last install
[ -z "${FLQ_PYTHON:-}" ] && [ "$root/pyproject.toml" -nt "$root/.venv/.flq-installed" ] && stale=1
if [ $stale = 1 ] || ! "$py" -c 'import flq, fastapi, openpyxl, matplotlib, safetensors, pytest, pytest_timeout, xdist, ruff, mypy' >/dev/null 2>&1; then
  say "installing flq-fed and its dependencies"
  "$py" -m pip install -q -e "$root[test]" >&2
  [ -z "${FLQ_PYTHON:-}" ] && touch "$root/.venv/.flq-installed"
fi
echo "$py"
