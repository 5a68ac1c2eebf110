#!/usr/bin/env bash
# Make the credentials of a deployment, in $DEPLOY_DIR/certs (see common.sh):
#
#   ca.crt, ca.key          a self-signed certificate authority (openssl)
#   server.crt, server.key  the SuperLink's TLS certificate, signed by the CA, valid
#                           for localhost, 127.0.0.1, ::1 and $SERVER_NAMES
#   node-I, node-I.pub      an EC P-384 key pair per SuperNode in OpenSSH format
#                           (ssh-keygen), I = 0 .. N-1, for SuperNode authentication
#
# Usage: scripts/tls/make_certs.sh N
# Environment: SERVER_NAMES, extra DNS names or IPs of the SuperLink, space separated
# (for nodes on other machines). Existing files are kept: run it again with a
# larger N to add node keys.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

N="${1:?usage: make_certs.sh N}"
mkdir -p "$CERTS"
cd "$CERTS"

if [[ ! -f ca.crt ]]; then
    openssl req -x509 -newkey rsa:3072 -nodes -sha256 -days 365 \
        -keyout ca.key -out ca.crt -subj "/CN=raffm deployment CA" 2>/dev/null
    say "made ca.crt"
fi

if [[ ! -f server.crt ]]; then
    san="DNS:localhost,IP:127.0.0.1,IP:::1"
    for name in ${SERVER_NAMES:-}; do
        if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then
            san="$san,IP:$name"
        else
            san="$san,DNS:$name"
        fi
    done
    openssl req -newkey rsa:3072 -nodes -sha256 -keyout server.key -out server.csr \
        -subj "/CN=localhost" 2>/dev/null
    printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
        "$san" > server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
        -days 365 -sha256 -extfile server.ext -out server.crt 2>/dev/null
    rm -f server.csr server.ext
    say "made server.crt for $san"
fi

for ((i = 0; i < N; i++)); do
    if [[ ! -f "node-$i" ]]; then
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "raffm-node-$i" -f "node-$i"
        say "made node-$i and node-$i.pub"
    fi
done
chmod 600 ./*.key
chmod 644 ./*.crt
