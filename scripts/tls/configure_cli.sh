#!/usr/bin/env bash
# Add the connection $CONNECTION to the Flower CLI's $FLWR_HOME/config.toml:
# the SuperLink's address and the CA certificate that verifies it.
#
# Usage: scripts/tls/configure_cli.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG="$FLWR_HOME/config.toml"
# `flwr config ls` writes the default config (with the `local` connection) if there is none.
flwr config ls >/dev/null
python - "$CONFIG" "$CONNECTION" "$SUPERLINK_HOST:$SUPERLINK_PORT" "$CERTS/ca.crt" <<'PY'
import sys, tomllib
path, name, address, ca = sys.argv[1:]
with open(path, "rb") as f:
    config = tomllib.load(f)
table = f"[superlink.{name}]"
if name in config.get("superlink", {}):
    # Rewrite our own table: drop its old lines, keep everything else.
    lines, skip = [], False
    for line in open(path).read().splitlines():
        if line.strip().startswith("["):
            skip = line.strip() == table
        if not skip:
            lines.append(line)
    text = "\n".join(lines).rstrip() + "\n"
else:
    text = open(path).read().rstrip() + "\n"
text += f'\n{table}\naddress = "{address}"\nroot-certificates = "{ca}"\n'
open(path, "w").write(text)
PY
say "CLI connection '$CONNECTION' -> $SUPERLINK_HOST:$SUPERLINK_PORT (CA $CERTS/ca.crt) in $CONFIG"
