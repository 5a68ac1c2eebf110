#!/usr/bin/env bash
# Start one SuperNode per budget, node I with key node-I, partition I of N.
#
# Each node connects over TLS (verifying the SuperLink with ca.crt) and signs
# in with its private key; its node config carries its budget and its share
# of the data: budget="B" partition-id=I num-partitions=N. A budget is a
# raffm_core Budget string ("params=0.5", "memory-mb=1500") or "auto" (the
# ClientApp measures the memory it may use and reports a memory-mb budget).
#
# Usage: scripts/deploy/start_supernodes.sh BUDGET [BUDGET ...]
# Example: scripts/deploy/start_supernodes.sh params=0.5 params=0.75 auto
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[[ $# -gt 0 ]] || { say "usage: start_supernodes.sh BUDGET [BUDGET ...]"; exit 1; }
N=$#
i=0
for budget in "$@"; do
    [[ -f "$CERTS/node-$i" ]] || { say "ERROR: no key $CERTS/node-$i; run make_certs.sh DIR $N"; exit 1; }
    # Each SuperNode serves its ClientApp process on a local port of its own.
    FLWR_HOME="$DEPLOY_DIR/node-$i" start_daemon "supernode-$i" flower-supernode \
        --root-certificates "$CERTS/ca.crt" \
        --superlink "$SUPERLINK_HOST:$SUPERLINK_PORT" \
        --auth-supernode-private-key "$CERTS/node-$i" \
        --port "$(free_port)" \
        --node-config "budget=\"$budget\" partition-id=$i num-partitions=$N"
    i=$((i + 1))
done
