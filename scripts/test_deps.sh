#!/usr/bin/env bash
# Install what the test suite needs besides Python packages (scripts/bootstrap.sh
# makes those): Debian's Fashion-MNIST (most tests), an sshd, ssh, ssh-keygen,
# rsync and curl (tests/test_deploy.py's deployments over a real sshd), openssl
# (the TLS tests), chromium (the dashboard's browser tests, driven by playwright
# with no browser download).
#
#   bash scripts/test_deps.sh [PYTHON]   # run_tests.sh does; PYTHON (with flq) finds the
#                                        # dataset wherever flq would, else Debian's folder
#
# With apt-get, as root or with passwordless sudo, what is missing is
# installed; otherwise (or with FLQ_TEST_DEPS_INSTALL=0) one line names what
# is missing and which tests will be skipped or fail. Exits 0 either way: the
# test run reports every skip with its reason.
set -uo pipefail
say() { printf '[test-deps] %s\n' "$*" >&2; }
PY=${1:-}

# what: "check|package|the tests that need it (;-separated)"
ITEMS=(
  "dataset:fashion-mnist|dataset-fashion-mnist|most tests (they fail)"
  "file:/usr/sbin/sshd|openssh-server|tests/test_deploy.py (ssh deployments skip)"
  "tool:ssh|openssh-client|tests/test_deploy.py (ssh deployments skip)"
  "tool:ssh-keygen|openssh-client|tests/test_deploy.py (ssh deployments skip)"
  "tool:rsync|rsync|tests/test_deploy.py (ssh deployments skip)"
  "tool:curl|curl|tests/test_deploy.py (ssh deployments skip)"
  "tool:openssl|openssl|the TLS tests in tests/test_client.py and test_server.py (fail)"
  "tool:chromium|chromium|the browser tests in tests/test_dashboard.py (fail)"
)
have() {
  case $1 in
    tool:*) command -v "${1#tool:}" >/dev/null 2>&1 ;;
    file:*) [ -x "${1#file:}" ] ;;
    dataset:*)
      if [ -n "$PY" ]; then
        "$PY" -c 'import sys; from flq.datasets import find_dataset_dir; sys.exit(0 if find_dataset_dir("fashion_mnist") else 1)' 2>/dev/null
      else
        [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]
      fi ;;
  esac
}
name() { case $1 in tool:* | file:*) basename "${1#*:}" ;; dataset:*) echo Fashion-MNIST ;; esac; }
missing() {   # the items missing now, one a line
  local it
  for it in "${ITEMS[@]}"; do have "${it%%|*}" || echo "$it"; done
}

todo=$(missing)
[ -n "$todo" ] || exit 0
packages=$(cut -d'|' -f2 <<< "$todo" | sort -u | tr '\n' ' ')
SUDO=()
can=0
if [ "${FLQ_TEST_DEPS_INSTALL:-1}" != 0 ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then can=1
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then can=1 SUDO=(sudo -n); fi
fi
if [ $can = 1 ]; then
  say "installing ${packages% } (apt-get)"
  # shellcheck disable=SC2086  # the package names are words
  { "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
      && "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages; } \
    >/dev/null 2>&1 || say "apt-get install ${packages% } failed"
  todo=$(missing)
  [ -n "$todo" ] || exit 0
  packages=$(cut -d'|' -f2 <<< "$todo" | sort -u | tr '\n' ' ')
fi
what=$(while IFS='|' read -r check _ _; do name "$check"; done <<< "$todo" | paste -sd, - | sed 's/,/, /g')
tests=$(cut -d'|' -f3 <<< "$todo" | tr ';' '\n' | sort -u | paste -sd';' - | sed 's/;/; /g')
say "missing: $what; affected: $tests; to install: apt-get install ${packages% }"
exit 0
