#!/usr/bin/env bash
# shellcheck disable=SC2317  # cleanup and its helpers run from traps
# Run a Flower app as a real deployment on loopback (flwr 1.42): one SuperLink,
# NUM_NODES SuperNodes, then `flwr run`; exits with the run's status. Secure by
# default: TLS (a fresh CA and server certificate) and SuperNode authentication
# (each node's key enrolled with `flwr supernode register` before it starts).
#
# usage: scripts/flower_loopback.sh APP_DIR NUM_NODES [--run-config "k=v ..."]...
#                                   [--node-config-extra "k=v ..."] [--kill-server-when FILE]
#                                   [--extra-node "k=v ..."]... [--unenrolled-node] [--insecure]
#        --kill-server-when FILE: once FILE exists (e.g. the run's checkpoint), SIGKILL the ServerApp, then start
#        the run again with resume=true (a killed server resumed); the status is the second run's
#        ("{i}" in --node-config-extra becomes the node's partition id)
#        --extra-node CONFIG: one more enrolled SuperNode with this whole node config (e.g. a second claim of a
#        partition: the ServerApp must refuse it)
#        --unenrolled-node: an attack check: one more SuperNode whose key is not enrolled; the SuperLink must
#        refuse it (its refusal line is printed) before the run starts, else the script fails
#        --insecure: plain HTTP and no node authentication (says what that gives up)
# env:   VENV (default: <repo>/.venv), LOG_DIR (default: a new temp dir),
#        READY_TIMEOUT (s, default 60), RUN_TIMEOUT (s, default 600)
# exit:  0 run finished:completed, 1 run failed/stopped (or an unenrolled node admitted), 2 usage, 124 timeout
set -euo pipefail

usage() { sed -n '8,22p' "$0" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
APP_DIR=$(cd "$1" && pwd) || usage
NUM_NODES=$2
shift 2
[[ $NUM_NODES =~ ^[1-9][0-9]*$ ]] || usage
RUN_CONFIG=()
NODE_EXTRA=""
KILL_WHEN=""
EXTRA_NODES=()
UNENROLLED=0
INSECURE=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --run-config) [[ $# -ge 2 ]] || usage; RUN_CONFIG+=(--run-config "$2"); shift 2 ;;
    --node-config-extra) [[ $# -ge 2 ]] || usage; NODE_EXTRA=$2; shift 2 ;;
    --kill-server-when) [[ $# -ge 2 ]] || usage; KILL_WHEN=$2; shift 2 ;;
    --extra-node) [[ $# -ge 2 ]] || usage; EXTRA_NODES+=("$2"); shift 2 ;;
    --unenrolled-node) UNENROLLED=1; shift ;;
    --insecure) INSECURE=1; shift ;;
    *) usage ;;
  esac
done
if ((INSECURE && UNENROLLED)); then
  echo "flower_loopback: --unenrolled-node needs node authentication, which --insecure turns off" >&2
  exit 2
fi
ENROLLED=$((NUM_NODES + ${#EXTRA_NODES[@]}))  # the SuperNodes that must come online

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$REPO/.venv}
READY_TIMEOUT=${READY_TIMEOUT:-60}
RUN_TIMEOUT=${RUN_TIMEOUT:-600}
LOG_DIR=${LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/flwr-loopback-logs.XXXXXX")}
mkdir -p "$LOG_DIR"
echo "flower_loopback: logs in $LOG_DIR" >&2

# A private FLWR_HOME keeps the user's ~/.flwr untouched and holds our own
# config.toml, so flwr never falls back to its default ":local:" connection
# (which would spawn a detached simulation SuperLink).
FLWR_HOME=$(mktemp -d "${TMPDIR:-/tmp}/flwr-home.XXXXXX")
export FLWR_HOME
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
# The control/fleet/runtime APIs are HTTP (httpx honours proxy variables).
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
# SuperLink/SuperNode start `flower-superexec` (and it `flwr-serverapp` /
# `flwr-clientapp`) by bare name, so the venv must come first on PATH.
export PATH="$VENV/bin:$PATH"
FLWR=$VENV/bin/flwr
PY=$VENV/bin/python
now_ms() { echo $((${EPOCHREALTIME/./} / 1000)); }
since() { local d=$(($(now_ms) - $1)); printf '%d.%ds' $((d / 1000)) $((d % 1000 / 100)); }

PGIDS=()   # the processes we started, each the leader of its own group
STREAM=""  # the background `flwr log` follower
descendants() {
  local c
  for c in $(pgrep -P "$1" || true); do echo "$c"; descendants "$c"; done
}
gone() {  # a zombie counts as gone; reap it if it is ours
  local st
  st=$(ps -o stat= -p "$1" 2>/dev/null) || return 0
  [[ $st == Z* ]] || return 1
  wait "$1" 2>/dev/null || true
}
cleanup() {
  local rc=$? pid kids=() alive
  trap - EXIT INT TERM
  [[ -z $STREAM ]] || kill -TERM "$STREAM" 2>/dev/null || true
  # The SuperLink's flower-superexec (and the flwr-serverapp under it) run in a
  # session of their own, out of reach of the group kill: so signal every
  # descendant too, else a live ServerApp lingers for seconds after its parents.
  for pid in "${PGIDS[@]}"; do
    mapfile -t -O "${#kids[@]}" kids < <(descendants "$pid")
  done
  for pid in "${PGIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${kids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  # superexec exits when its parent does, but a zombie parent still looks
  # alive to it: so `gone` reaps ours promptly.
  for _ in $(seq 50); do
    alive=0
    for pid in "${PGIDS[@]}" "${kids[@]}"; do gone "$pid" || alive=1; done
    ((alive)) || break
    sleep 0.2
  done
  for pid in "${PGIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  for pid in "${kids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$FLWR_HOME"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Start "$@" in a new session (own process group, out of reach of the
# terminal's Ctrl-C) so cleanup can kill it and all its children by group.
start() {
  local log=$1; shift
  setsid "$@" >"$log" 2>&1 </dev/null &
  PGIDS+=("$!")
}

# One loopback port for the SuperLink (Control + Fleet + ServerApp runtime API
# all share it in 1.42) and one per SuperNode (its ClientApp runtime API).
mapfile -t PORTS < <("$PY" - "$((ENROLLED + UNENROLLED + 1))" <<'EOF'
import random, socket, sys
n, ports = int(sys.argv[1]), []
while len(ports) < n:
    p = random.randint(20000, 40000)
    if p in ports:
        continue
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            continue
    ports.append(p)
print(*ports, sep="\n")
EOF
)
LINK=127.0.0.1:${PORTS[0]}
echo "flower_loopback: SuperLink $LINK, SuperNode ports ${PORTS[*]:1}" >&2

flwr_ready() {  # prints how many SuperNodes are online ("" while the Control API does not answer)
  "$FLWR" supernode list loopback --format json 2>/dev/null | "$PY" -c '
import json, sys
try:
    nodes = json.load(sys.stdin).get("nodes")
except ValueError:
    nodes = None
print("" if nodes is None else sum(n.get("status") == "online" for n in nodes))' || true
}

T0=$SECONDS T0MS=$(now_ms)
# No runtime `uv sync`: apps must run from the venv as installed (and offline).
LINK_ARGS=(--host 127.0.0.1 --port "${PORTS[0]}" --disable-runtime-dependency-installation)
NODE_TLS=()  # each SuperNode's TLS and key options, by index
if ((INSECURE)); then
  echo "flower_loopback: --insecure gives up TLS (anyone on the network path reads every message: the global" \
    "prompt, each client's release, the run config) and SuperNode authentication (any process that reaches the" \
    "SuperLink's port joins as a node, claims a partition, receives G and sends updates)" >&2
  printf '[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "%s"\ninsecure = true\n' "$LINK" \
    >"$FLWR_HOME/config.toml"
  LINK_ARGS+=(--insecure)
  for ((i = 0; i < ENROLLED; i++)); do NODE_TLS[i]="--insecure"; done
else
  # A fresh CA and server certificate for 127.0.0.1, and one key pair per SuperNode (private keys 0600), in the
  # private FLWR_HOME (removed on exit).
  TLS=$FLWR_HOME/tls KEYS=$FLWR_HOME/keys
  # credentials.py needs only `cryptography`: loaded by path, it skips fpl_fast's own imports (torch: seconds).
  "$PY" - "$REPO/fpl_fast/flower/credentials.py" "$TLS" "$KEYS" "$((ENROLLED + UNENROLLED))" <<'EOF'
import importlib.util
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location("credentials", sys.argv[1])
credentials = importlib.util.module_from_spec(spec)
spec.loader.exec_module(credentials)
credentials.make_certs(Path(sys.argv[2]))
for i in range(int(sys.argv[4])):
    credentials.make_node_key(Path(sys.argv[3]) / f"node-{i}")
EOF
  printf '[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "%s"\nroot-certificates = "%s"\n' \
    "$LINK" "$TLS/ca.pem" >"$FLWR_HOME/config.toml"
  LINK_ARGS+=(--ssl-ca-certfile "$TLS/ca.pem" --ssl-certfile "$TLS/server.pem" --ssl-keyfile "$TLS/server.key"
    --enable-supernode-auth)
  for ((i = 0; i < ENROLLED + UNENROLLED; i++)); do
    NODE_TLS[i]="--root-certificates $TLS/ca.pem --auth-supernode-private-key $KEYS/node-$i"
  done
fi
start "$LOG_DIR/superlink.log" "$VENV/bin/flower-superlink" "${LINK_ARGS[@]}"

if ((!INSECURE)); then  # enrol each node's public key (not the unenrolled one's) once the Control API answers
  until [[ -n $(flwr_ready) ]]; do
    ((SECONDS - T0 < READY_TIMEOUT)) || { echo "flower_loopback: no SuperLink answer in ${READY_TIMEOUT}s" >&2; exit 124; }
    sleep 0.5
  done
  enrol=()  # in parallel: each `flwr` call takes seconds to start
  for ((i = 0; i < ENROLLED; i++)); do
    timeout 60 "$FLWR" supernode register "$KEYS/node-$i.pub" loopback >"$LOG_DIR/enrol-$i.log" 2>&1 &
    enrol+=("$!")
  done
  for ((i = 0; i < ENROLLED; i++)); do
    wait "${enrol[i]}" || { echo "flower_loopback: enrolling node $i failed:" >&2; cat "$LOG_DIR/enrol-$i.log" >&2; exit 1; }
  done
  echo "flower_loopback: TLS on; $ENROLLED SuperNode keys enrolled after $(since "$T0MS")" >&2
fi

for ((i = 0; i < ENROLLED; i++)); do
  if ((i < NUM_NODES)); then
    extra=${NODE_EXTRA//\{i\}/$i}
    config="partition-id=$i num-partitions=$NUM_NODES${extra:+ $extra}"
  else
    config=${EXTRA_NODES[i - NUM_NODES]}
  fi
  # shellcheck disable=SC2086  # NODE_TLS[i] is a list of options
  start "$LOG_DIR/supernode-$i.log" "$VENV/bin/flower-supernode" ${NODE_TLS[i]} \
    --superlink "$LINK" --host 127.0.0.1 --port "${PORTS[i + 1]}" --node-config "$config"
done
if ((UNENROLLED)); then  # the federation's CA, but a key of its own that no one enrolled
  log=$LOG_DIR/supernode-unenrolled.log
  # shellcheck disable=SC2086
  start "$log" "$VENV/bin/flower-supernode" ${NODE_TLS[ENROLLED]} --max-retries 2 \
    --superlink "$LINK" --host 127.0.0.1 --port "${PORTS[ENROLLED + 1]}" \
    --node-config "partition-id=0 num-partitions=$NUM_NODES"
  intruder=${PGIDS[-1]}
  # Refused = it logged its exit (its helper's teardown takes seconds more; cleanup stops what is left).
  until gone "$intruder" || grep -q 'Exit Code' "$log"; do
    ((SECONDS - T0 < READY_TIMEOUT)) || { echo "flower_loopback: the unenrolled SuperNode was not refused" >&2; exit 1; }
    sleep 0.5
  done
  # Flower's exit message: "Exit Code: N", the reason, "[code: N] <the SuperLink's answer>", a help link
  refusal=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -E 'Exit Code|Failed|\[code: ' | sed 's/^[A-Z]* *: *//' |
    tr -s ' \n' ' ' || true)
  echo "flower_loopback: unenrolled SuperNode refused: $refusal" >&2
fi

# Ready = the Control API answers and lists the enrolled SuperNodes online.
online=0
while ((SECONDS - T0 < READY_TIMEOUT)); do
  online=$(flwr_ready)
  ((${online:-0} >= ENROLLED)) && break
  sleep 0.5
done
if ((${online:-0} < ENROLLED)); then
  echo "flower_loopback: only ${online:-0}/$ENROLLED SuperNodes online after ${READY_TIMEOUT}s" >&2
  exit 124
fi
if ((online > ENROLLED)); then
  echo "flower_loopback: $online SuperNodes online, $ENROLLED enrolled: an unenrolled node was admitted" >&2
  exit 1
fi
echo "flower_loopback: $ENROLLED SuperNodes online after $(since "$T0MS")" >&2

T1=$SECONDS T1MS=$(now_ms)
start_run() {  # prints the new run's id
  timeout 120 "$FLWR" run "$APP_DIR" loopback --format json "${RUN_CONFIG[@]}" "$@" |
    tee -a "$LOG_DIR/flwr-run.json" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["run-id"])' || {
    echo "flower_loopback: flwr run failed to start a run:" >&2; cat "$LOG_DIR/flwr-run.json" >&2; exit 1; }
}
RUN_ID=$(start_run)
if [[ -n $KILL_WHEN ]]; then
  until [[ -f $KILL_WHEN ]]; do
    ((SECONDS - T1 < RUN_TIMEOUT)) || { echo "flower_loopback: $KILL_WHEN never appeared" >&2; exit 124; }
    sleep 0.5
  done
  # The ServerApp runs under our SuperLink's superexec: kill exactly that process.
  for pid in $(descendants "${PGIDS[0]}"); do
    if [[ $(ps -o args= -p "$pid" 2>/dev/null) == *flwr-serverapp* ]]; then
      kill -KILL "$pid" && echo "flower_loopback: run $RUN_ID: ServerApp (pid $pid) killed after $(since "$T1MS")" >&2
    fi
  done
  RUN_ID=$(start_run --run-config "resume=true")
fi
echo "flower_loopback: run $RUN_ID started; ServerApp log: $LOG_DIR/serverapp.log" >&2
# The log stream (the ServerApp's stdout) ends when the run finishes. In the
# background, so that a TERM to this script is handled at once.
timeout "$RUN_TIMEOUT" "$FLWR" log "$RUN_ID" loopback --stream >"$LOG_DIR/serverapp.log" 2>&1 &
STREAM=$!
wait "$STREAM" || true
STREAM=""
cat "$LOG_DIR/serverapp.log" >&2

# `flwr run` and `flwr log` exit 0 even when the ServerApp fails: ask for the status.
status=""
while ((SECONDS - T1 < RUN_TIMEOUT)); do
  status=$("$FLWR" ls loopback --run-id "$RUN_ID" --format json 2>/dev/null | "$PY" -c '
import json, sys
r = json.load(sys.stdin)["runs"][0]
print(r["status"], "|", r.get("status-details", ""))' || true)
  [[ $status == finished* ]] && break
  sleep 1
done
echo "flower_loopback: run $RUN_ID: ${status:-unknown} (run $(since "$T1MS"), total $(since "$T0MS"))" >&2
[[ $status == finished:completed* ]] && exit 0
[[ $status == finished* ]] && exit 1
exit 124
