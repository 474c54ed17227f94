#!/usr/bin/env bash
# The test suite's wall time side by side: BEFORE (a checkout of an older commit, its extension built) once, then
# this checkout RUNS times, each with its own README test command (`python -m pytest -q`, plus -p no:cacheprovider
# so no run leaves a cache for the next), one after the other on this machine. PYTHONPATH points each run's
# subprocesses (the Flower runtimes' `python -m fpl_fast.run`) at the checkout under test, as a fresh clone's own
# editable install would. Logs go to LOGS (default: a temporary folder); the summary to stdout.
# Usage: bash bench/suite_time.sh BEFORE_CHECKOUT [RUNS]   (PY: the interpreter, default .venv/bin/python)
set -uo pipefail
AFTER=$(cd "$(dirname "$0")/.." && pwd)
BEFORE=$(cd "${1:?usage: bash bench/suite_time.sh BEFORE_CHECKOUT [RUNS]}" && pwd)
RUNS=${2:-2}
PY=${PY:-$AFTER/.venv/bin/python}
LOGS=${LOGS:-$(mktemp -d)}
lscpu | grep "Model name"
echo "cores: $(nproc); python: $PY; logs: $LOGS"

run() { # label checkout
  local start end rc
  echo "== $1: $2 at $(git -C "$2" rev-parse --short HEAD), load average $(cut -d' ' -f1-3 /proc/loadavg)"
  start=$(date +%s.%N)
  (cd "$2" && PYTHONPATH="$2" "$PY" -m pytest -q -p no:cacheprovider) > "$LOGS/$1.log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  printf '%s: exit %d, %.1f s wall; %s; load average after %s\n' "$1" "$rc" "$(echo "$end - $start" | bc)" \
    "$(tail -1 "$LOGS/$1.log" | sed 's/=//g; s/^ *//; s/ *$//')" "$(cut -d' ' -f1-3 /proc/loadavg)"
}

run before "$BEFORE"
for i in $(seq 1 "$RUNS"); do
  run "after-$i" "$AFTER"
done
