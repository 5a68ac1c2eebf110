#!/usr/bin/env bash
# Start one SuperNode per budget, node I with key node-I, partition I of N.
#
# Each node connects over TLS (verifying the SuperLink with ca.crt) and signs
# in with its private key; its node config carries its budget and its share
# of the data: budget="B" partition-id=I num-partitions=N. A budget is a
# raffm_core Budget string ("params=0.5", "memory-mb=1500") or "auto" (the
# ClientApp measures the memory it may use and reports a memory-mb budget).
#
# It returns once every node has connected and been activated by the SuperLink
# (its log shows "SuperNode ID"), and fails, with the node's exit code and last
# error line, when one exits instead (e.g. 305 "Failed to activate SuperNode")
# or has not connected within $SUPERNODE_WAIT_S seconds (default 120).
#
# Usage: scripts/tls/start_supernodes.sh BUDGET [BUDGET ...]
# Example: scripts/tls/start_supernodes.sh params=0.5 params=0.75 auto
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[[ $# -gt 0 ]] || { say "usage: start_supernodes.sh BUDGET [BUDGET ...]"; exit 1; }
N=$#
i=0
for budget in "$@"; do
    [[ -f "$CERTS/node-$i" ]] || { say "ERROR: no key $CERTS/node-$i; run scripts/tls/make_certs.sh $N"; exit 1; }
    # Each SuperNode serves its ClientApp process on a local port of its own.
    FLWR_HOME="$DEPLOY_DIR/node-$i" start_daemon "supernode-$i" flower-supernode \
        --root-certificates "$CERTS/ca.crt" \
        --superlink "$SUPERLINK_HOST:$SUPERLINK_PORT" \
        --auth-supernode-private-key "$CERTS/node-$i" \
        --port "$(free_port)" \
        --node-config "budget=\"$budget\" partition-id=$i num-partitions=$N"
    i=$((i + 1))
done

# Wait until each node is connected, or has exited (a child of this shell: `wait` has its code).
deadline=$(( $(date +%s) + ${SUPERNODE_WAIT_S:-120} ))
failed=0 still_online=0
for ((i = 0; i < N; i++)); do
    pid="$(cat "$PIDS/supernode-$i.pid")"
    log="$LOGS/supernode-$i.log"
    until grep -q "SuperNode ID" "$log" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then
            status=0
            wait "$pid" || status=$?
            code="$(grep -ao 'Exit Code: [0-9]*' "$log" | tail -n 1)"
            reason="$(grep -aE '^\[code: [0-9]+\]' "$log" | tail -n 1)"
            say "ERROR: supernode-$i exited (${code:-status $status}): ${reason:-see $log}"
            grep -aq "Failed to activate SuperNode" "$log" && still_online=1
            failed=1
            break
        fi
        if (( $(date +%s) > deadline )); then
            say "ERROR: supernode-$i did not connect within ${SUPERNODE_WAIT_S:-120} s; see $log"
            failed=1
            break
        fi
        sleep 0.5
    done
    grep -q "SuperNode ID" "$log" 2>/dev/null \
        && say "supernode-$i is connected ($(grep -ao 'SuperNode ID: [0-9]*' "$log" | head -n 1))"
done
if (( still_online )); then
    say "  305 \"Failed to activate SuperNode\": the SuperLink still lists that node as online,"
    say "  because it was not stopped before the SuperLink (scripts/tls/stop.sh stops nodes"
    say "  first). That expires after two heartbeats (60 s): run scripts/tls/stop.sh, then"
    say "  start_superlink.sh and this script again a minute later."
fi
if (( failed )); then
    say "ERROR: not every SuperNode is up; scripts/tls/stop.sh stops those that are"
    exit 1
fi
