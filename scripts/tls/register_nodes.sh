#!/usr/bin/env bash
# Register SuperNode public keys with the SuperLink (needs configure_cli.sh).
# Only a SuperNode whose key is registered can connect.
#
# Usage: scripts/tls/register_nodes.sh N      registers $DEPLOY_DIR/certs/node-0.pub .. node-(N-1).pub
#        scripts/tls/register_nodes.sh KEY.pub ...
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ $# -eq 1 && "$1" =~ ^[0-9]+$ ]]; then
    keys=()
    for ((i = 0; i < $1; i++)); do keys+=("$CERTS/node-$i.pub"); done
else
    keys=("$@")
fi
[[ ${#keys[@]} -gt 0 ]] || { say "usage: register_nodes.sh N | KEY.pub ..."; exit 1; }
for key in "${keys[@]}"; do
    node_id="$(flwr supernode register "$key" "$CONNECTION" --format json \
        | python -c 'import json, sys; print(json.load(sys.stdin)["node-id"])')"
    say "registered $(basename "$key") as node $node_id"
done
