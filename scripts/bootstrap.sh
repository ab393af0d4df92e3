#!/usr/bin/env bash
# Make a Python environment that can run FLQ-Fed and print its interpreter's path.
#
#   PY=$(bash scripts/bootstrap.sh)           # quiet; progress goes to stderr
#
# Order: $FLQ_PYTHON if set (e.g. a conda env's python on a Jetson); else the
# repo's .venv, created on first use with --system-site-packages so an
# existing PyTorch (NVIDIA's Jetson wheel, say) is reused.
#
# PyTorch, when that python cannot import it, is installed before the project
# (so pip never pulls the default build as a dependency):
# - Linux without a working `nvidia-smi` (no NVIDIA GPU): the CPU build, from
#   PyTorch's CPU wheel index https://download.pytorch.org/whl/cpu (the
#   default build on x86-64 brings several GB of CUDA libraries). When that
#   index cannot be reached within 10 s, one line says so and pip's own
#   index is used (whatever pip.conf / PIP_INDEX_URL say).
# - with a working `nvidia-smi`, or not on Linux: the default build from pip's
#   own index (CUDA on Linux x86-64).
# - Jetson: no pip wheel has its GPU; install NVIDIA's wheel for your JetPack
#   (README, "Jetson") and point FLQ_PYTHON at that python. Without it the
#   CPU build is installed, with a one-line hint.
# Environment:
#   FLQ_TORCH="torch==2.13.0"   the requirement pip installs (default: torch==2.13.0,
#                               else the newest torch>=2.0,<3 where that build is missing)
#   FLQ_TORCH_INDEX_URL=URL     install PyTorch from this index only (no fall-back);
#                               set but empty: pip's own index (default build)
#   FLQ_BOOTSTRAP_DRY_RUN=1     print the pip command(s) for PyTorch and exit;
#                               nothing is created or installed
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
say() { printf '[bootstrap] %s\n' "$*" >&2; }
CPU_INDEX=https://download.pytorch.org/whl/cpu
OWN="pip's own index"
case ${FLQ_BOOTSTRAP_DRY_RUN:-0} in '' | 0 | false | no) DRY_RUN=0 ;; *) DRY_RUN=1 ;; esac

if [ -n "${FLQ_PYTHON:-}" ]; then
  py=$FLQ_PYTHON
else
  py=$root/.venv/bin/python
  if [ ! -x "$py" ] && [ $DRY_RUN = 0 ]; then
    base=$(command -v python3 || command -v python)
    if ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 9))' 2>/dev/null; then
      echo "bootstrap: $base is $("$base" --version 2>&1) and FLQ-Fed needs Python >= 3.9 (JetPack 5 ships 3.8: README, Jetson); set FLQ_PYTHON to a newer python" >&2
      exit 1
    fi
    say "creating $root/.venv with $($base --version 2>&1)"
    "$base" -m venv --system-site-packages "$root/.venv"
    "$py" -m pip install -q --upgrade pip >&2 2>/dev/null || true
  fi
fi

# ---- PyTorch: which build, from where ----------------------------------------
has_gpu() {   # a working nvidia-smi that lists a GPU (a broken driver can make it hang: 20 s at most)
  command -v nvidia-smi >/dev/null 2>&1 || return 1
  if command -v timeout >/dev/null 2>&1; then timeout 20 nvidia-smi -L >/dev/null 2>&1; else nvidia-smi -L >/dev/null 2>&1; fi
}
specs=("${FLQ_TORCH:-torch==2.13.0}")
[ -n "${FLQ_TORCH:-}" ] || specs+=('torch>=2.0,<3')   # where 2.13.0 has no build for this Python or platform
fallback=""   # the index tried first may be skipped for pip's own
if [ -n "${FLQ_TORCH_INDEX_URL+set}" ]; then
  index=$FLQ_TORCH_INDEX_URL
  why="FLQ_TORCH_INDEX_URL"
elif [ "$(uname -s)" != Linux ]; then
  index="" why="not Linux: the default build"
elif has_gpu; then
  index="" why="nvidia-smi sees a GPU: the default (CUDA) build"
else
  index=$CPU_INDEX fallback=1 why="no working nvidia-smi: the CPU build"
  if [ -e /etc/nv_tegra_release ]; then
    why+="; on Jetson, NVIDIA's wheel for your JetPack has the GPU (README, Jetson; then set FLQ_PYTHON)"
  fi
fi
# pip_torch INDEX SPEC: the pip command that installs SPEC from INDEX ('' = pip's own)
pip_torch() { cmd=("$py" -m pip install -q); [ -z "$1" ] || cmd+=(--index-url "$1"); cmd+=("$2"); }
show() {   # the command as one line for a POSIX shell
  local a out=""
  for a in "$@"; do
    case $a in *[!A-Za-z0-9_./:=@%+,-]*) out+="'${a//\'/\'\\\'\'}' " ;; *) out+="$a " ;; esac
  done
  echo "${out% }"
}

if [ $DRY_RUN = 1 ]; then
  echo "torch: ${index:-$OWN} ($why)"
  for s in "${specs[@]}"; do pip_torch "$index" "$s"; echo "would run: $(show "${cmd[@]}")"; done
  if [ -n "$fallback" ]; then
    echo "if $index cannot be reached:"
    for s in "${specs[@]}"; do pip_torch "" "$s"; echo "would run: $(show "${cmd[@]}")"; done
  fi
  exit 0
fi

# install_torch INDEX: each requirement in turn until one installs
install_torch() {
  local s
  for s in "${specs[@]}"; do
    pip_torch "$1" "$s"
    "${cmd[@]}" >&2 && return 0
  done
  return 1
}
reachable() {   # the index answers within 10 s (proxies from the environment apply, as for pip)
  "$py" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10).close()' "$1/torch/" >/dev/null 2>&1
}
if ! "$py" -c 'import torch' >/dev/null 2>&1; then
  say "installing PyTorch from ${index:-$OWN} ($why)"
  if [ -n "$fallback" ] && ! reachable "$index"; then
    say "$index cannot be reached: installing PyTorch from pip's own index instead (FLQ_TORCH_INDEX_URL chooses)"
    install_torch ""
  elif ! install_torch "$index"; then
    [ -n "$fallback" ] || exit 1
    say "installing from $index failed: installing PyTorch from pip's own index instead"
    install_torch ""
  fi
fi
stale=0   # our own .venv: reinstall when pyproject.toml changed since the last install
[ -z "${FLQ_PYTHON:-}" ] && [ "$root/pyproject.toml" -nt "$root/.venv/.flq-installed" ] && stale=1
if [ $stale = 1 ] || ! "$py" -c 'import flq, fastapi, openpyxl, matplotlib, safetensors, prometheus_client, tensorboard, playwright, ray, psutil, pytest, pytest_timeout, xdist, ruff, mypy' >/dev/null 2>&1; then
  say "installing flq-fed and its dependencies"
  "$py" -m pip install -q -e "$root[test]" >&2
  [ -z "${FLQ_PYTHON:-}" ] && touch "$root/.venv/.flq-installed"
fi
echo "$py"
