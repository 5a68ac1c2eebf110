#!/usr/bin/env bash
# Run the default federation (`flwr run .`) on a private local SuperLink.
#
# * FLWR_HOME is .flwr/ in the repo (git-ignored): the CLI config, the
#   SuperLink's state and log, and the copies of the app `flwr run` installs.
# * The local SuperLink gets two free ports of its own, so it neither
#   collides with nor reuses another project's daemons.
# * `flwr run --stream` exits 0 even when the run failed: the run's status is
#   read back with `flwr ls` and a failed run makes this script exit non-zero.
# * The SuperLink daemons `flwr run` starts stay up after the run, and Ray
#   workers can outlive the simulation; on any exit this script stops the
#   processes it started (by pid, found through a marker in their environment).
#
# Usage: scripts/run_local.sh [extra --run-config overrides, e.g. 'num-server-rounds=8']
# Environment: NUM_SUPERNODES (default 10), RESULTS_DIR (default results/<timestamp>).
# The dataset is the embedded polarity corpus unless an override names another
# ('dataset="/abs/path.csv"' or a hub name).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

export FLWR_HOME="$ROOT/.flwr"
export PATH="$ROOT/.venv/bin:$PATH"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
# Ray's FutureWarning about accelerator env vars (no GPUs here): take the future behaviour
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
mkdir -p "$FLWR_HOME"

NUM_SUPERNODES="${NUM_SUPERNODES:-10}"
RESULTS_DIR="${RESULTS_DIR:-$ROOT/results/$(date +%Y%m%d-%H%M%S)}"
LOG="$RESULTS_DIR/flwr-run.log"

log() { echo "[run_local] $*" >&2; }

# Two free local ports (the kernel picks them; released just before use).
read -r HTTP_PORT CONTROL_PORT < <(python - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)
export FLWR_LOCAL_SUPERLINK_HTTP_API_PORT="$HTTP_PORT"
export FLWR_LOCAL_CONTROL_API_PORT="$CONTROL_PORT"

# Every process started from here inherits RAFFM_RUN_MARKER, including the
# SuperLink `flwr run` detaches and the Ray workers of the simulation, which
# outlive their parents. At exit the script stops exactly those, by pid.
export RAFFM_RUN_MARKER="run_local-$$-$(date +%s%N)"
OWN_PGID="$(ps -o pgid= $$ | tr -d ' ')"

our_daemons() {
    local environ pid
    for environ in /proc/[0-9]*/environ; do
        pid="${environ#/proc/}"
        pid="${pid%/environ}"
        # skip this script and its own pipeline and subshells (same process group)
        [[ "$(ps -o pgid= "$pid" 2>/dev/null | tr -d ' ')" == "$OWN_PGID" ]] && continue
        if { tr '\0' '\n' < "$environ"; } 2>/dev/null | grep -qx "RAFFM_RUN_MARKER=$RAFFM_RUN_MARKER"; then
            echo "$pid"
        fi
    done
}

stop_daemons() {
    set +e  # best effort: never let cleanup change the exit status
    local pids alive pid
    pids="$(our_daemons | tr '\n' ' ')"
    [[ -z "${pids// /}" ]] && return 0
    log "stopping the processes this run left (SuperLink, SuperExec, Ray): pids $pids"
    kill $pids 2>/dev/null
    for _ in $(seq 50); do
        alive=""
        for pid in $pids; do
            kill -0 "$pid" 2>/dev/null && alive="$alive $pid"
        done
        [[ -z "$alive" ]] && return 0
        sleep 0.2
    done
    log "force-stopping pids$alive"
    kill -9 $alive 2>/dev/null
    return 0
}
trap stop_daemons EXIT

OVERRIDES=("results-dir=\"$RESULTS_DIR\"" "min-available-nodes=$NUM_SUPERNODES")
# the embedded polarity corpus unless an override names another dataset (a key may appear once)
[[ " $* " == *" dataset="* ]] || OVERRIDES=("dataset=\"$ROOT/data/polarity/polarity.csv\"" "${OVERRIDES[@]}")
# Check the config, model, data and budgets in seconds, before SuperLink and Ray start;
# it also restores the TOML quotes make strips from string values (ARGS='strategy="x"').
log "preflight: checking the run config, model, dataset and budgets"
# A failed preflight leaves no results directory.
if ! RUN_CONFIG="$(python scripts/preflight.py --nodes "$NUM_SUPERNODES" "${OVERRIDES[@]}" "$@")"; then
    log "ERROR: not started; the traceback: .venv/bin/python scripts/preflight.py --verbose ARGS"
    exit 2
fi
mkdir -p "$RESULTS_DIR"

# A failed run's one line: the ServerApp's status.json, else Flower's status (written there too).
fail() {
    local error
    error="$(python - "$RESULTS_DIR/status.json" "$1" "$LOG" <<'EOF'
import json, sys
from pathlib import Path
path, status, log = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
if path.is_file():
    print(json.loads(path.read_text()).get("error", status))
else:
    error = status
    path.write_text(json.dumps({"status": "failed", "error": error}, indent=2) + "\n")
    print(error)
EOF
)"
    log "ERROR: the run failed: $error (full log: $LOG)"
    exit 1
}

log "FLWR_HOME=$FLWR_HOME, SuperLink ports $HTTP_PORT (HTTP) and $CONTROL_PORT (control)"
log "results: $RESULTS_DIR"
start=$(date +%s)
# The log keeps every line; the terminal is spared Flower's notices that do not apply
# here: the changed *default* number of simulated SuperNodes (we pass the number) and
# how to change it, and pyproject.toml's missing "license" property.
flwr run . --stream \
    --federation-config "num-supernodes=$NUM_SUPERNODES client-resources-num-cpus=1" \
    --run-config "$RUN_CONFIG" 2>&1 | tee "$LOG" | {
    grep --line-buffered -v \
        -e 'default simulated SuperNodes changed' \
        -e 'To change federation size, use the following command' \
        -e 'flwr federation simulation-config' \
        -e 'Flower App configuration warnings in' \
        -e 'Recommended property "license"' || true
}

RUN_ID="$(sed -n 's/.*Successfully started run \([0-9][0-9]*\).*/\1/p' "$LOG" | head -n1)"
[[ -n "$RUN_ID" ]] || fail "flwr run did not start a run"
STATUS="$(flwr ls --run-id "$RUN_ID" --format json | python -c '
import json, sys
runs = json.load(sys.stdin).get("runs", [])
print(runs[0]["status"] if runs else "unknown")
')"
log "run $RUN_ID: status $STATUS, $(( $(date +%s) - start )) s"
[[ "$STATUS" == "finished:completed" ]] || fail "run $RUN_ID ended with status $STATUS"
[[ -f "$RESULTS_DIR/summary.json" ]] || fail "no summary.json in $RESULTS_DIR"
log "results directory: $RESULTS_DIR"
