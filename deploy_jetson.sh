#!/usr/bin/env bash
# Deploy FLQ-Fed to a cluster (Jetson boards or any Linux hosts) over ssh and
# start it: one master, one worker per entry of WORKER_IPS (worker id = index).
#
#   ./deploy_jetson.sh                          # the IPs below, flq_config.json, port 5000
#   ./deploy_jetson.sh --master-ip 10.0.0.1 --worker-ips "10.0.0.2 10.0.0.3" --user nvidia
#   ./deploy_jetson.sh --master-ip=10.0.0.1 --user=nvidia   # --flag=value works as well
#   ./deploy_jetson.sh --dry-run                # print every command, run none
#   ./deploy_jetson.sh --credentials creds      # per-worker keys (flq credentials --workers N --out creds [--tls])
#   ./deploy_jetson.sh --stop                   # stop master and workers on all hosts
#
# For each distinct host (one IP may host the master and several workers):
# copy the project (rsync over ssh, else tar | ssh tar x) to REMOTE_DIR, without
# .git, .venv, results, logs and __pycache__; copy the config; install with
# scripts/bootstrap.sh (FLQ_PYTHON is passed on when set, e.g. the conda env's
# python on a Jetson); start the master with nohup, wait until its /status
# answers (asked on the master host itself), then start the workers.
# With --credentials DIR (made by flq credentials), each host gets only its
# own files in REMOTE_DIR/credentials (mode 700): the master host
# master.secret (and master.pem, master-key.pem, operator.pem, operator-key.pem,
# ca.pem with --tls), worker i's host worker_i.key (and worker_i.pem,
# worker_i-key.pem, ca.pem); ca-key.pem is never copied.
# Needs passwordless ssh (keys) to every host; see --help.
# shellcheck disable=SC2015,SC2016,SC2088  # remote commands are built as text on purpose
set -euo pipefail

# ---- the cluster (edit here, or use the environment / flags) ---------------
MASTER_IP="${MASTER_IP:-192.168.1.100}"
if [ -n "${WORKER_IPS:-}" ]; then read -r -a WORKER_IPS <<< "${WORKER_IPS//,/ }"; else
WORKER_IPS=("192.168.1.101" "192.168.1.102" "192.168.1.103" "192.168.1.104")
fi
# -----------------------------------------------------------------------------

SSH_USER="${SSH_USER:-$(id -un)}"
SSH_PORT="${SSH_PORT:-22}"
SSH_KEY="${SSH_KEY:-}"
SSH_OPTS="${SSH_OPTS:-}"            # extra ssh options, split on spaces (e.g. "-o UserKnownHostsFile=/tmp/kh")
REMOTE_DIR="${REMOTE_DIR:-~/flq-fed}"
CONFIG="${CONFIG:-flq_config.json}"
CREDENTIALS="${FLQ_CREDENTIALS:-}"  # folder made by flq credentials ('' = shared token only)
MASTER_PORT="${MASTER_PORT:-5000}"
TIMEOUT="${DEPLOY_TIMEOUT:-180}"    # seconds to wait for the master's /status
STOP_GRACE="${STOP_GRACE:-30}"      # --stop: seconds to let processes exit after POST /stop
DRY_RUN=0 STOP=0 INSTALL=1 USE_RSYNC=1
# For testing or custom launchers: a bash command run instead of
# ./start_master.sh / ./start_worker.sh, in REMOTE_DIR, with the standard
# arguments in "$@" and FLQ_ROLE, FLQ_WORKER_ID, FLQ_MASTER_IP,
# FLQ_MASTER_PORT, FLQ_CONFIG in its environment, e.g.
#   FLQ_DEPLOY_START_CMD_WORKER='conda run -n fed ./start_worker.sh "$@"'
START_CMD_MASTER="${FLQ_DEPLOY_START_CMD_MASTER:-}"
START_CMD_WORKER="${FLQ_DEPLOY_START_CMD_WORKER:-}"

PROG=$(basename "$0")
ROOT=$(cd "$(dirname "$0")" && pwd)

usage() {
  cat <<EOF
Usage: $PROG [options]

Copy FLQ-Fed to the master and worker hosts over ssh, install it, start the
master, wait for http://MASTER_IP:MASTER_PORT/status, start the workers.

  --master-ip IP        master host (env MASTER_IP; now $MASTER_IP)
  --worker-ips "A B"    worker hosts, worker id = position (env WORKER_IPS; now ${WORKER_IPS[*]})
  --user USER           ssh user (env SSH_USER; default: you, $SSH_USER)
  --ssh-port N          ssh port (env SSH_PORT; default 22)
  --ssh-key FILE        ssh private key (env SSH_KEY)
  --remote-dir DIR      where the project goes on each host (env REMOTE_DIR; default ~/flq-fed)
  --config FILE         config for the master (default flq_config.json); copied to each host
  --credentials DIR     per-worker credentials made by 'flq credentials --workers N --out DIR [--tls]'
                        (env FLQ_CREDENTIALS): each host gets only its own; with ca.pem in DIR the
                        master serves HTTPS and requires client certificates
  --master-port N       the master's HTTP port (default 5000)
  --timeout S           how long to wait for the master to answer (env DEPLOY_TIMEOUT; default 180)
  --no-install          skip the remote install (scripts/bootstrap.sh)
  --no-rsync            copy with tar over ssh even when rsync is available
  --dry-run             print every command, run none
  --stop                stop master and workers on all hosts (POST /stop first; env STOP_GRACE s to exit, default 30)
  -h, --help            this help

Each option with a value also takes it after "=": --master-ip=10.0.0.1.

Environment: SSH_OPTS (extra ssh options, split on spaces), FLQ_PYTHON (the
python to use on the hosts, e.g. a conda env's; passed on when set),
FLQ_DEPLOY_START_CMD_MASTER / FLQ_DEPLOY_START_CMD_WORKER (for testing or custom
launchers: a bash command run instead of ./start_master.sh / ./start_worker.sh
with their arguments in "\$@").
Logs on each host: REMOTE_DIR/logs/deploy_master.out, deploy_worker<i>.out, *.pid.
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 1; }
say() { echo "[deploy] $*"; }

need_arg() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }
while [ $# -gt 0 ]; do
  case $1 in   # --flag=value: the same as --flag value
    --no-install=* | --no-rsync=* | --dry-run=* | --stop=* | --help=*) die "${1%%=*} takes no value (see --help)" ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
  esac
  case $1 in
    --master-ip)   need_arg "$@"; MASTER_IP=$2; shift 2 ;;
    --worker-ips)  need_arg "$@"; read -r -a WORKER_IPS <<< "${2//,/ }"; shift 2 ;;
    --user)        need_arg "$@"; SSH_USER=$2; shift 2 ;;
    --ssh-port)    need_arg "$@"; SSH_PORT=$2; shift 2 ;;
    --ssh-key)     need_arg "$@"; SSH_KEY=$2; shift 2 ;;
    --remote-dir)  need_arg "$@"; REMOTE_DIR=$2; shift 2 ;;
    --config)      need_arg "$@"; CONFIG=$2; shift 2 ;;
    --credentials) need_arg "$@"; CREDENTIALS=$2; shift 2 ;;
    --master-port) need_arg "$@"; MASTER_PORT=$2; shift 2 ;;
    --timeout)     need_arg "$@"; TIMEOUT=$2; shift 2 ;;
    --no-install)  INSTALL=0; shift ;;
    --no-rsync)    USE_RSYNC=0; shift ;;
    --dry-run)     DRY_RUN=1; shift ;;
    --stop)        STOP=1; shift ;;
    -h|--help)     usage; exit 0 ;;
    *) die "unknown option: $1 (see --help)" ;;
  esac
done

is_uint() { case $1 in ''|*[!0-9]*) return 1 ;; esac; }
[ -n "$MASTER_IP" ] || die "no master IP (--master-ip)"
is_uint "$SSH_PORT" || die "--ssh-port must be a number, not '$SSH_PORT'"
is_uint "$MASTER_PORT" || die "--master-port must be a number, not '$MASTER_PORT'"
is_uint "$TIMEOUT" || die "--timeout must be a number of seconds, not '$TIMEOUT'"
is_uint "$STOP_GRACE" || die "STOP_GRACE must be a number of seconds, not '$STOP_GRACE'"
[ -z "$SSH_KEY" ] || [ -r "$SSH_KEY" ] || die "ssh key not found: $SSH_KEY"
[ -n "$REMOTE_DIR" ] || die "--remote-dir is empty"

# ---- quoting and running ----------------------------------------------------
# q WORD: WORD for a POSIX shell (single quotes unless it is plain).
q() {
  case $1 in
    '') printf "''" ;;
    *[!A-Za-z0-9_./:=@%+,-]*) printf "'%s'" "${1//\'/\'\\\'\'}" ;;
    *) printf '%s' "$1" ;;
  esac
}
# The remote directory as a shell expression: a leading ~ becomes "$HOME".
rdir_expr() {
  case $1 in
    '~') printf '"$HOME"' ;;
    '~/'*) printf '"$HOME"/%s' "$(q "${1#\~/}")" ;;
    *) q "$1" ;;
  esac
}
show() { local a out=""; for a in "$@"; do out+="$(q "$a") "; done; echo "+ ${out% }"; }
# run CMD...: print it in a dry run, else run it.
run() { if [ "$DRY_RUN" = 1 ]; then show "$@"; else "$@"; fi; }

SSH=(ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new -o ConnectTimeout=10 -p "$SSH_PORT")
[ -z "$SSH_KEY" ] || SSH+=(-i "$SSH_KEY")
if [ -n "$SSH_OPTS" ]; then read -r -a _extra <<< "$SSH_OPTS"; SSH+=("${_extra[@]}"); fi
# The same ssh command as one string for rsync -e (rsync splits it on spaces and honours quotes).
RSYNC_RSH=$(for a in "${SSH[@]}"; do q "$a"; printf ' '; done); RSYNC_RSH=${RSYNC_RSH% }

target() { printf '%s@%s' "$SSH_USER" "$1"; }
# rssh HOST CMD: run the shell command CMD on HOST.
rssh() { local h=$1; shift; run "${SSH[@]}" "$(target "$h")" "$*"; }
# rscript HOST SCRIPT: run the bash script SCRIPT on HOST (sent on stdin).
rscript() {
  if [ "$DRY_RUN" = 1 ]; then show "${SSH[@]}" "$(target "$1")" "bash -s" | sed 's/$/ <<'"'"'EOF'"'"'/'; printf '%s\nEOF\n' "$2"
  else "${SSH[@]}" "$(target "$1")" "bash -s" <<< "$2"; fi
}

# alive PID: the process exists and is not a zombie.
REMOTE_ALIVE='alive() { kill -0 "$1" 2>/dev/null || return 1; s=$(sed "s/.*) //" /proc/"$1"/stat 2>/dev/null | cut -c1); [ "$s" != Z ]; }'

# ---- hosts ------------------------------------------------------------------
HOSTS=()
add_host() { local h; for h in "${HOSTS[@]+"${HOSTS[@]}"}"; do [ "$h" = "$1" ] && return; done; HOSTS+=("$1"); }
add_host "$MASTER_IP"
for ip in "${WORKER_IPS[@]+"${WORKER_IPS[@]}"}"; do add_host "$ip"; done
declare -A RDIR RABS   # host -> remote directory as a shell expression / as a plain path
for h in "${HOSTS[@]}"; do RDIR[$h]=$(rdir_expr "$REMOTE_DIR"); RABS[$h]=$REMOTE_DIR; done

# ---- credentials: which files go to which host --------------------------------
TLS=0
CRED_REMOTE=credentials
MASTER_TLS_FILES="ca.pem master.pem master-key.pem operator.pem operator-key.pem"   # with --tls, for the master's host
worker_tls_files() { echo "worker_$1.pem worker_$1-key.pem"; }                      # ... and for worker i's (with ca.pem)
if [ -n "$CREDENTIALS" ]; then
  [ -d "$CREDENTIALS" ] || die "--credentials: no such folder: $CREDENTIALS"
  CREDENTIALS=$(cd "$CREDENTIALS" && pwd)
  [ -r "$CREDENTIALS/master.secret" ] || die "--credentials $CREDENTIALS: no master.secret (make it with: flq credentials --workers ${#WORKER_IPS[@]} --out DIR)"
  for i in "${!WORKER_IPS[@]}"; do
    [ -r "$CREDENTIALS/worker_$i.key" ] || die "--credentials $CREDENTIALS: no worker_$i.key for worker $i (flq credentials --workers ${#WORKER_IPS[@]})"
  done
  if [ -e "$CREDENTIALS/ca.pem" ]; then
    TLS=1
    for f in $MASTER_TLS_FILES; do
      [ -r "$CREDENTIALS/$f" ] || die "--credentials $CREDENTIALS: ca.pem but no $f (flq credentials --tls makes it)"
    done
    if command -v openssl >/dev/null 2>&1; then   # the workers check the master's certificate against MASTER_IP
      case $MASTER_IP in *:*) how=-checkip ;; *[!0-9.]*) how=-checkhost ;; *) how=-checkip ;; esac
      openssl x509 -in "$CREDENTIALS/master.pem" -noout "$how" "$MASTER_IP" 2>/dev/null | grep -q "does match" \
        || die "--credentials $CREDENTIALS: master.pem is not valid for $MASTER_IP (make it with: flq credentials --tls --master-host $MASTER_IP ...)"
    fi
    for i in "${!WORKER_IPS[@]}"; do
      for f in $(worker_tls_files "$i"); do
        [ -r "$CREDENTIALS/$f" ] || die "--credentials $CREDENTIALS: ca.pem but no $f (flq credentials --tls)"
      done
    done
  fi
fi
declare -A HOST_FILES   # host -> the credential files it gets (space-separated)
if [ -n "$CREDENTIALS" ]; then
  HOST_FILES[$MASTER_IP]="master.secret"
  [ "$TLS" = 0 ] || HOST_FILES[$MASTER_IP]+=" $MASTER_TLS_FILES"
  for i in "${!WORKER_IPS[@]}"; do
    h=${WORKER_IPS[$i]}
    HOST_FILES[$h]="${HOST_FILES[$h]:-} worker_$i.key"
    if [ "$TLS" = 1 ]; then
      case " ${HOST_FILES[$h]} " in *" ca.pem "*) ;; *) HOST_FILES[$h]+=" ca.pem" ;; esac
      HOST_FILES[$h]+=" $(worker_tls_files "$i")"
    fi
  done
fi
SCHEME=http
CURL_TLS=""      # curl's flags to reach the master, run in the master's REMOTE_DIR
PY_TLS=""        # the same for the python fallback: CA, certificate, key
if [ "$TLS" = 1 ]; then
  SCHEME=https
  CURL_TLS="--cacert $CRED_REMOTE/ca.pem --cert $CRED_REMOTE/operator.pem --key $CRED_REMOTE/operator-key.pem "
  PY_TLS="$CRED_REMOTE/ca.pem $CRED_REMOTE/operator.pem $CRED_REMOTE/operator-key.pem"
fi
STATUS_URL="$SCHEME://$MASTER_IP:$MASTER_PORT/status"
PY_ENV=""
[ -z "${FLQ_PYTHON:-}" ] || PY_ENV="FLQ_PYTHON=$(q "$FLQ_PYTHON") "

# ---- stop -------------------------------------------------------------------
if [ "$STOP" = 1 ]; then
  say "asking the master to stop: POST $SCHEME://$MASTER_IP:$MASTER_PORT/stop"
  rssh "$MASTER_IP" "cd ${RDIR[$MASTER_IP]} 2>/dev/null; curl -fsS -X POST --max-time 10 -o /dev/null ${CURL_TLS}$SCHEME://$MASTER_IP:$MASTER_PORT/stop" \
    || say "(the master did not answer /stop; killing the processes)"
  failed=0
  for h in "${HOSTS[@]}"; do
    say "stopping the processes on $h"
    script="cd ${RDIR[$h]} 2>/dev/null || { echo 'nothing deployed here'; exit 0; }
$REMOTE_ALIVE
n=0
for f in logs/master.pid logs/worker*.pid; do
  [ -f \"\$f\" ] || continue
  pid=\$(cat \"\$f\")
  case \$pid in ''|*[!0-9]*) rm -f \"\$f\"; continue ;; esac
  n=\$((n+1))
  t=0; while alive \"\$pid\" && [ \$t -lt $STOP_GRACE ]; do sleep 1; t=\$((t+1)); done
  if alive \"\$pid\"; then
    kill -TERM -- -\"\$pid\" 2>/dev/null || kill -TERM \"\$pid\" 2>/dev/null
    t=0; while alive \"\$pid\" && [ \$t -lt 10 ]; do sleep 1; t=\$((t+1)); done
    alive \"\$pid\" && { kill -KILL -- -\"\$pid\" 2>/dev/null || kill -KILL \"\$pid\" 2>/dev/null; }
    sleep 0.2; alive \"\$pid\" && { echo \"could not stop pid \$pid (\$f)\" >&2; exit 1; }
  fi
  rm -f \"\$f\"; echo \"stopped \$f (pid \$pid)\"
done
[ \$n -gt 0 ] || echo 'no pid files: nothing running'"
    rscript "$h" "$script" || { echo "$PROG: error: could not stop everything on $h" >&2; failed=1; }
  done
  [ "$failed" = 0 ] || exit 1
  say "stopped"
  exit 0
fi

# ---- the config -------------------------------------------------------------
if [ -f "$CONFIG" ]; then cfg_abs="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
elif [ -f "$ROOT/$CONFIG" ]; then cfg_abs="$ROOT/$CONFIG"
else die "config file not found: $CONFIG"; fi
[ -r "$cfg_abs" ] || die "config file not readable: $cfg_abs"
if command -v python3 >/dev/null 2>&1; then
  err=$(python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$cfg_abs" 2>&1 | tail -n 1) \
    || die "config file is not valid JSON: $cfg_abs: $err"
fi
# On the hosts the config keeps its path inside the project, else goes to the top as its own name.
case $cfg_abs in "$ROOT"/*) CFG_REL=${cfg_abs#"$ROOT"/} ;; *) CFG_REL=$(basename "$cfg_abs") ;; esac

[ "${#WORKER_IPS[@]}" -gt 0 ] || say "warning: no worker IPs; starting the master only"
if command -v python3 >/dev/null 2>&1; then   # fewer workers than the run needs: it would wait, then end
  need=$(python3 -c 'import json, sys
c = json.load(open(sys.argv[1])); s = c.get("system") if isinstance(c.get("system"), dict) else {}
t = s.get("total_workers", c.get("total_workers", 20)); m = s.get("min_workers", c.get("min_workers", 0))
print(int(m) or int(t))' "$cfg_abs" 2>/dev/null || true)
  if [ -n "$need" ] && [ "${#WORKER_IPS[@]}" -lt "$need" ]; then
    say "warning: the run needs $need workers (system.min_workers; 0 = total_workers) but WORKER_IPS has" \
        "${#WORKER_IPS[@]}: the master will wait system.start_timeout_s for the others, then end (exit 5)"
  fi
fi
if [ -n "$CREDENTIALS" ] && command -v python3 >/dev/null 2>&1; then   # keys for every worker id of the run
  short=$(python3 -c 'import json, sys
c = json.load(open(sys.argv[1])); s = c.get("system") if isinstance(c.get("system"), dict) else {}
t = int(s.get("total_workers", c.get("total_workers", 20))); w = int(json.load(open(sys.argv[2]))["workers"])
print(f"{w} {t}" if w < t else "")' "$cfg_abs" "$CREDENTIALS/master.secret" 2>/dev/null || true)
  [ -z "$short" ] || die "--credentials $CREDENTIALS was made for ${short% *} workers but the config's total_workers is ${short#* }: flq credentials --workers ${short#* } --out NEW_DIR"
fi
[ "$DRY_RUN" = 1 ] && say "dry run: printing the commands, running none"

# ---- 1. reach every host, make the directory, see what it has ----------------
declare -A HAS_RSYNC
for h in "${HOSTS[@]}"; do
  probe="mkdir -p ${RDIR[$h]} && cd ${RDIR[$h]} && echo \"dir=\$(pwd)\"
command -v rsync >/dev/null 2>&1 && echo rsync=yes
$REMOTE_ALIVE
for f in logs/master.pid logs/worker*.pid; do [ -f \"\$f\" ] && alive \"\$(cat \"\$f\")\" && echo \"running=\$f\"; done
true"
  if [ "$DRY_RUN" = 1 ]; then
    rscript "$h" "$probe"; HAS_RSYNC[$h]=yes; continue
  fi
  errf=$(mktemp); rc=0
  out=$("${SSH[@]}" "$(target "$h")" "bash -s" <<< "$probe" 2>"$errf") || rc=$?
  err=$(grep -v '^Warning: Permanently added' "$errf" | tail -n 1 || true); rm -f "$errf"
  if [ "$rc" = 255 ]; then die "cannot reach $(target "$h") over ssh (port $SSH_PORT): ${err:-ssh failed}"; fi
  [ "$rc" = 0 ] || die "on $h: cannot create $REMOTE_DIR: ${err:-exit $rc}"
  dir=$(sed -n 's/^dir=//p' <<< "$out")
  [ -n "$dir" ] || die "on $h: could not find $REMOTE_DIR"
  RDIR[$h]=$(q "$dir"); RABS[$h]=$dir
  HAS_RSYNC[$h]=$(sed -n 's/^rsync=//p' <<< "$out")
  running=$(sed -n 's/^running=//p' <<< "$out" | tr '\n' ' ')
  [ -z "$running" ] || die "on $h: already running ($dir/${running% }); run $PROG --stop first"
done

# ---- 2. copy ----------------------------------------------------------------
EXCLUDES=(.git .venv __pycache__ .pytest_cache '*.egg-info' /results /logs /checkpoints /worker_state "/$CFG_REL" "/$CRED_REMOTE")
# credentials inside the project never travel with it: each host gets only its own (below)
case $CREDENTIALS in "$ROOT"/*) EXCLUDES+=("/${CREDENTIALS#"$ROOT"/}") ;; esac
local_rsync=0; command -v rsync >/dev/null 2>&1 && local_rsync=1
for h in "${HOSTS[@]}"; do
  d=${RDIR[$h]}
  if [ "$USE_RSYNC" = 1 ] && [ "$local_rsync" = 1 ] && [ "${HAS_RSYNC[$h]}" = yes ]; then
    say "copying the project to $h:$d (rsync)"
    args=(rsync -az)
    for e in "${EXCLUDES[@]}"; do args+=("--exclude=$e"); done
    run "${args[@]}" -e "$RSYNC_RSH" "$ROOT/" "$(target "$h"):${RABS[$h]}/" || die "copying to $h failed (rsync)"
  else
    say "copying the project to $h:$d (tar over ssh)"
    targs=(tar -C "$ROOT" -czf -)
    for e in "${EXCLUDES[@]}"; do
      case $e in /*) targs+=("--exclude=.$e") ;; *) targs+=("--exclude=$e") ;; esac
    done
    targs+=(.)
    if [ "$DRY_RUN" = 1 ]; then
      echo "$(show "${targs[@]}" | sed 's/^+ //') | $(show "${SSH[@]}" "$(target "$h")" "mkdir -p $d && tar -xzf - -C $d" | sed 's/^+ //')" | sed 's/^/+ /'
    else
      "${targs[@]}" | "${SSH[@]}" "$(target "$h")" "mkdir -p $d && tar -xzf - -C $d" \
        || die "copying to $h failed"
    fi
  fi
  say "copying the config $cfg_abs to $h:$d/$CFG_REL"
  cfg_cmd="cat > $d/$(q "$CFG_REL")"
  case $CFG_REL in */*) cfg_cmd="mkdir -p $d/$(q "$(dirname "$CFG_REL")") && $cfg_cmd" ;; esac
  if [ "$DRY_RUN" = 1 ]; then
    echo "$(show "${SSH[@]}" "$(target "$h")" "$cfg_cmd") < $(q "$cfg_abs")"
  else
    "${SSH[@]}" "$(target "$h")" "$cfg_cmd" < "$cfg_abs" \
      || die "copying the config to $h failed"
  fi
  if [ -n "$CREDENTIALS" ]; then
    files=${HOST_FILES[$h]:-}; files=${files# }
    say "copying to $h only its own credentials: ${files:-none}"
    rssh "$h" "rm -rf $d/$CRED_REMOTE && mkdir -m 700 $d/$CRED_REMOTE" || die "preparing $h:$d/$CRED_REMOTE failed"
    for f in $files; do
      put="umask 077 && cat > $d/$CRED_REMOTE/$f"
      if [ "$DRY_RUN" = 1 ]; then
        echo "$(show "${SSH[@]}" "$(target "$h")" "$put") < $(q "$CREDENTIALS/$f")"
      else
        "${SSH[@]}" "$(target "$h")" "$put" < "$CREDENTIALS/$f" || die "copying $f to $h failed"
      fi
    done
  fi
done

# ---- 3. install ---------------------------------------------------------------
if [ "$INSTALL" = 1 ]; then
  for h in "${HOSTS[@]}"; do
    say "installing on $h (scripts/bootstrap.sh: venv, PyTorch, the project; this can take a while)"
    rssh "$h" "cd ${RDIR[$h]} && PY=\$(${PY_ENV}bash scripts/bootstrap.sh) && bash scripts/find_dataset.sh \"\$PY\"" \
      || die "installing on $h failed (see the output above)"
  done
else
  say "skipping the install (--no-install)"
fi

# ---- 4. start -----------------------------------------------------------------
# launch HOST NAME COMMAND: start COMMAND in the background in the remote dir,
# output to logs/deploy_NAME.out, its pid in logs/NAME.pid.
launch() {
  local h=$1 name=$2 cmd=$3
  rssh "$h" "cd ${RDIR[$h]} && mkdir -p logs && S=; command -v setsid >/dev/null 2>&1 && S=setsid; ${PY_ENV}\$S nohup $cmd > logs/deploy_$name.out 2>&1 < /dev/null & echo \$! > logs/$name.pid"
}

m_args="--config $(q "$CFG_REL") --port $MASTER_PORT"
if [ -n "$CREDENTIALS" ]; then
  m_args+=" --credentials $CRED_REMOTE/master.secret"
  [ "$TLS" = 0 ] || m_args+=" --certfile $CRED_REMOTE/master.pem --keyfile $CRED_REMOTE/master-key.pem --cafile $CRED_REMOTE/ca.pem"
fi
if [ -n "$START_CMD_MASTER" ]; then
  m_cmd="env FLQ_ROLE=master FLQ_MASTER_IP=$(q "$MASTER_IP") FLQ_MASTER_PORT=$MASTER_PORT FLQ_CONFIG=$(q "$CFG_REL") bash -c $(q "$START_CMD_MASTER") flq-master $m_args"
else
  m_cmd="./start_master.sh $m_args"
fi
say "starting the master on $MASTER_IP:$MASTER_PORT"
launch "$MASTER_IP" master "$m_cmd" || die "could not start the master on $MASTER_IP"

md=${RDIR[$MASTER_IP]}
say "waiting for $STATUS_URL (up to ${TIMEOUT}s)"
wait_script="cd $md || exit 3
$REMOTE_ALIVE
i=0
while [ \$i -lt $TIMEOUT ]; do
  if command -v curl >/dev/null 2>&1; then curl -fsS --max-time 3 -o /dev/null ${CURL_TLS}$STATUS_URL 2>/dev/null && exit 0
  else python3 -c 'import ssl, sys, urllib.request; c = ssl.create_default_context(cafile=sys.argv[2]) if len(sys.argv) > 2 else None; c and c.load_cert_chain(*sys.argv[3:5]); urllib.request.urlopen(sys.argv[1], timeout=3, context=c)' $STATUS_URL $PY_TLS 2>/dev/null && exit 0; fi
  pid=\$(cat logs/master.pid 2>/dev/null)
  if [ -n \"\$pid\" ] && ! alive \"\$pid\"; then tail -n 20 logs/deploy_master.out >&2; exit 2; fi
  sleep 1; i=\$((i+1))
done
tail -n 20 logs/deploy_master.out >&2
exit 1"
rc=0; rscript "$MASTER_IP" "$wait_script" || rc=$?
case $rc in
  0) ;;
  2) die "the master on $MASTER_IP exited before answering $STATUS_URL (its log: $md/logs/deploy_master.out, last lines above)" ;;
  255) die "cannot reach $(target "$MASTER_IP") over ssh while waiting for the master" ;;
  *) die "the master did not answer $STATUS_URL within ${TIMEOUT}s (its log: $md/logs/deploy_master.out; stop it with $PROG --stop)" ;;
esac
[ "$DRY_RUN" = 1 ] || say "the master answers $STATUS_URL"

for i in "${!WORKER_IPS[@]}"; do
  h=${WORKER_IPS[$i]}
  w_args="--worker_id $i --master_ip $(q "$MASTER_IP") --master_port $MASTER_PORT"
  if [ -n "$CREDENTIALS" ]; then
    w_args+=" --credential $CRED_REMOTE/worker_$i.key"
    [ "$TLS" = 0 ] || w_args+=" --cafile $CRED_REMOTE/ca.pem --certfile $CRED_REMOTE/worker_$i.pem --keyfile $CRED_REMOTE/worker_$i-key.pem"
  fi
  if [ -n "$START_CMD_WORKER" ]; then
    w_cmd="env FLQ_ROLE=worker FLQ_WORKER_ID=$i FLQ_MASTER_IP=$(q "$MASTER_IP") FLQ_MASTER_PORT=$MASTER_PORT bash -c $(q "$START_CMD_WORKER") flq-worker $w_args"
  else
    w_cmd="./start_worker.sh $w_args"
  fi
  say "starting worker $i on $h"
  launch "$h" "worker$i" "$w_cmd" || die "could not start worker $i on $h"
done

# ---- summary ------------------------------------------------------------------
[ "$DRY_RUN" = 1 ] && { say "dry run done: nothing was run"; exit 0; }
echo
say "deployed: master on $MASTER_IP:$MASTER_PORT, ${#WORKER_IPS[@]} worker(s)"
say "  master    $MASTER_IP:${RABS[$MASTER_IP]}/logs/deploy_master.out (pid file logs/master.pid; the run's own log: logs/master_*.log)"
for i in "${!WORKER_IPS[@]}"; do
  say "  worker $i  ${WORKER_IPS[$i]}:${RABS[${WORKER_IPS[$i]}]}/logs/deploy_worker$i.out"
done
say "status: curl $STATUS_URL"
say "stop:   $PROG --stop (with the same host options), or curl -X POST http://$MASTER_IP:$MASTER_PORT/stop"
