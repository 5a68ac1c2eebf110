#!/usr/bin/env bash
# Start a SuperLink with TLS and SuperNode authentication.
#
# It serves the Fleet, Control and Runtime APIs on one HTTPS port
# ($SUPERLINK_HOST:$SUPERLINK_PORT) with the certificate made by make_certs.sh,
# admits only SuperNodes whose public key was registered (register_nodes.sh),
# keeps its state in $DEPLOY_DIR/superlink.db and runs ServerApps in this
# Python environment (no runtime dependency installation).
#
# Usage: scripts/tls/start_superlink.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

for f in ca.crt server.crt server.key; do
    [[ -f "$CERTS/$f" ]] || { say "ERROR: no $CERTS/$f; run scripts/tls/make_certs.sh first"; exit 1; }
done
start_daemon superlink flower-superlink \
    --ssl-ca-certfile "$CERTS/ca.crt" \
    --ssl-certfile "$CERTS/server.crt" \
    --ssl-keyfile "$CERTS/server.key" \
    --enable-supernode-auth \
    --host "$SUPERLINK_HOST" --port "$SUPERLINK_PORT" \
    --database "$DEPLOY_DIR/superlink.db" \
    --disable-runtime-dependency-installation

# Ready when the HTTPS port accepts a TLS handshake signed by our CA.
for _ in $(seq 60); do
    if python - "$SUPERLINK_HOST" "$SUPERLINK_PORT" "$CERTS/ca.crt" <<'PY' 2>/dev/null; then
import socket, ssl, sys
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
with socket.create_connection((host, port), timeout=1) as sock:
    with ctx.wrap_socket(sock, server_hostname=host):
        pass
PY
        say "SuperLink is up on https://$SUPERLINK_HOST:$SUPERLINK_PORT"
        exit 0
    fi
    if ! kill -0 "$(cat "$PIDS/superlink.pid")" 2>/dev/null; then
        say "ERROR: the SuperLink exited; see $LOGS/superlink.log"
        exit 1
    fi
    sleep 0.5
done
say "ERROR: the SuperLink did not come up within 30 s; see $LOGS/superlink.log"
exit 1
