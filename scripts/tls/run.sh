#!/usr/bin/env bash
# Check the run (scripts/preflight.py: config, model, dataset, budgets; one line and
# exit 2 on a mistake), launch the app on the deployment: `flwr run . $CONNECTION --stream`, then
# read the run's final status back (`flwr run` exits 0 even when the
# ServerApp failed) and exit non-zero unless it is finished:completed.
#
# Usage: scripts/tls/run.sh [RUN_CONFIG]   e.g. 'num-server-rounds=2 min-available-nodes=3'
# The run's log is written to $DEPLOY_DIR/logs/run.log.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$ROOT"

# Check the config, model, data and budgets in seconds, before anything reaches the SuperLink.
say "preflight: checking the run config, model, dataset and budgets"
if ! RUN_CONFIG="$(python scripts/preflight.py ${1:+"$1"})"; then
    say "ERROR: not started; the traceback: .venv/bin/python scripts/preflight.py --verbose '...'"
    exit 2
fi
LOG="$LOGS/run.log"
flwr run . "$CONNECTION" --stream ${RUN_CONFIG:+--run-config "$RUN_CONFIG"} 2>&1 | tee "$LOG"
RUN_ID="$(sed -n 's/.*Successfully started run \([0-9][0-9]*\).*/\1/p' "$LOG" | head -n1)"
[[ -n "$RUN_ID" ]] || { say "ERROR: flwr run did not start a run (see $LOG)"; exit 1; }
STATUS="$(flwr ls "$CONNECTION" --run-id "$RUN_ID" --format json | python -c '
import json, sys
runs = json.load(sys.stdin).get("runs", [])
print(runs[0]["status"] if runs else "unknown")
')"
say "run $RUN_ID: status $STATUS"
[[ "$STATUS" == "finished:completed" ]]
