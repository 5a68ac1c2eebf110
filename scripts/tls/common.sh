# Shared settings of the scripts in scripts/tls/ (sourced, not run).
#
# Every setting can be overridden from the environment:
#   DEPLOY_DIR      state of this deployment: certs/, pids/, logs/   (default: .deploy/)
#   FLWR_HOME       the Flower CLI's config and the SuperNodes' app copies (default: $DEPLOY_DIR/flwr-home)
#   SUPERLINK_HOST  address the SuperLink listens on and nodes dial  (default: 127.0.0.1)
#   SUPERLINK_PORT  the SuperLink's one HTTP port (Fleet, Control and Runtime APIs; default 8000)
#   CONNECTION      name of the CLI connection in $FLWR_HOME/config.toml (default: raffm-tls)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEPLOY_DIR="$(mkdir -p "${DEPLOY_DIR:-$ROOT/.deploy}" && cd "${DEPLOY_DIR:-$ROOT/.deploy}" && pwd)"
export FLWR_HOME="${FLWR_HOME:-$DEPLOY_DIR/flwr-home}"
SUPERLINK_HOST="${SUPERLINK_HOST:-127.0.0.1}"
SUPERLINK_PORT="${SUPERLINK_PORT:-8000}"
CONNECTION="${CONNECTION:-raffm-tls}"
CERTS="$DEPLOY_DIR/certs"
PIDS="$DEPLOY_DIR/pids"
LOGS="$DEPLOY_DIR/logs"
mkdir -p "$FLWR_HOME" "$PIDS" "$LOGS"

# The project's venv, if there is one, comes first (flwr, flower-superlink, ...).
[[ -d "$ROOT/.venv/bin" ]] && export PATH="$ROOT/.venv/bin:$PATH"
# Apps run in this environment: no `uv sync` of the app's dependencies per run.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
# A SuperNode's SuperExec looks for a new task (one ClientApp process per message) every
# this many seconds; Flower's default is 1 s (docs/scale.md, "one process per message").
export FLWR_SUPEREXEC_TASK_POLL_INTERVAL="${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-0.2}"

say() { echo "[deploy] $*" >&2; }

# start_daemon NAME CMD...: run CMD in its own session (so the daemons it spawns,
# SuperExec and the app processes, share its process group), log to logs/NAME.log
# and write its pid, which is also the group id, to pids/NAME.pid.
start_daemon() {
    local name="$1"
    shift
    if [[ -f "$PIDS/$name.pid" ]] && kill -0 "$(cat "$PIDS/$name.pid")" 2>/dev/null; then
        say "ERROR: $name is already running (pid $(cat "$PIDS/$name.pid")); run scripts/tls/stop.sh first"
        return 1
    fi
    setsid "$@" >"$LOGS/$name.log" 2>&1 < /dev/null &
    echo $! >"$PIDS/$name.pid"
    say "started $name (pid $!), log $LOGS/$name.log"
}

# free_port: a TCP port the kernel reports free on 127.0.0.1.
free_port() {
    python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
