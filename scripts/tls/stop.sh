#!/usr/bin/env bash
# Stop every daemon the deploy scripts started, by the pid in $DEPLOY_DIR/pids/
# (each was started in its own session, so its process group also holds the
# SuperExec and app processes it spawned).
#
# Usage: scripts/tls/stop.sh
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

shopt -s nullglob
# SuperNodes first: stopped while the SuperLink is still up, each deactivates itself
# there. A node killed after the SuperLink stays "online" in superlink.db for two
# heartbeats (60 s), and a restarted node with its key is refused until then
# (exit code 305, "Failed to activate SuperNode").
for pidfile in "$PIDS"/supernode-*.pid "$PIDS"/superlink.pid; do
    [[ -f "$pidfile" ]] || continue
    pid="$(cat "$pidfile")"
    name="$(basename "$pidfile" .pid)"
    if kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null; then
        for _ in $(seq 50); do
            kill -0 -- "-$pid" 2>/dev/null || break
            sleep 0.2
        done
        if kill -0 -- "-$pid" 2>/dev/null; then
            say "force-stopping $name (process group $pid)"
            kill -9 -- "-$pid" 2>/dev/null
        fi
        say "stopped $name (pid $pid)"
    fi
    rm -f "$pidfile"
done
