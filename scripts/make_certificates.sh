#!/usr/bin/env bash
# Certificates and keys for a fedprompt pilot on Flower's deployment engine (flwr 1.41).
# See docs/deployment.md for where each file goes.
set -euo pipefail

usage() {
    cat <<EOF
Usage: $(basename "$0") [-n NUM_SUPERNODES] OUT_DIR [HOSTNAME_OR_IP...]

Creates in OUT_DIR (idempotent: existing files are kept, only what is missing or stale
is (re)made):

  ca.key, ca.crt            a private certificate authority (ECDSA P-384, ${CA_DAYS:-3650} days)
  server.key, server.crt    the SuperLink's TLS certificate signed by the CA, with
                            subjectAltName localhost, 127.0.0.1, ::1 and every
                            HOSTNAME_OR_IP given (${CERT_DAYS:-825} days); remade when the
                            name list changes or it no longer verifies against ca.crt
  supernode-keys/supernode-<i>, supernode-<i>.pub   (i = 0 .. NUM_SUPERNODES-1)
                            ECDSA P-384 OpenSSH key pairs for SuperNode authentication
                            (flwr supernode register / flower-supernode
                            --auth-supernode-private-key)

Options:
  -n NUM_SUPERNODES   number of SuperNode key pairs (default: \${NUM_SUPERNODES:-2})
  -h                  this help

Environment: CA_DAYS, CERT_DAYS (validity), PYTHON (interpreter with 'cryptography', used
when ssh-keygen is absent), FEDPROMPT_KEYGEN=python to force the Python key generator.

Give the coordinator's public DNS name or IP as HOSTNAME_OR_IP: SuperNodes at other sites
must reach the SuperLink by a name that is in the certificate.

Distribute: ca.crt to every site and to the operator running 'flwr'; server.key and
server.crt stay on the coordinator; supernode-<i> (private) only to site i; all *.pub to
the coordinator for 'flwr supernode register'. ca.key should be kept offline.
EOF
}

num_supernodes="${NUM_SUPERNODES:-2}"
while getopts ":n:h" opt; do
    case "$opt" in
        n) num_supernodes="$OPTARG" ;;
        h) usage; exit 0 ;;
        :) echo "error: -$OPTARG needs a value" >&2; usage >&2; exit 2 ;;
        *) echo "error: unknown option -$OPTARG" >&2; usage >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))

if [[ $# -lt 1 ]]; then
    usage >&2
    exit 2
fi
if ! [[ "$num_supernodes" =~ ^[0-9]+$ ]]; then
    echo "error: NUM_SUPERNODES must be a non-negative integer, got '$num_supernodes'" >&2
    exit 2
fi
command -v openssl >/dev/null || { echo "error: openssl is not installed" >&2; exit 1; }

out_dir="$1"
shift
ca_days="${CA_DAYS:-3650}"
cert_days="${CERT_DAYS:-825}"
script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

mkdir -p "$out_dir/supernode-keys"
out_dir="$(cd "$out_dir" && pwd)"
umask 077
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# ---------------------------------------------------------------- subjectAltName
san="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do
    if [[ "$name" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || "$name" == *:* ]]; then
        entry="IP:$name"
    elif [[ "$name" =~ ^[A-Za-z0-9*]([A-Za-z0-9.*-]*[A-Za-z0-9])?$ ]]; then
        entry="DNS:$name"
    else
        echo "error: '$name' is neither a host name nor an IP address" >&2
        exit 2
    fi
    case ",$san," in *",$entry,"*) ;; *) san="$san,$entry" ;; esac
done

# ---------------------------------------------------------------- CA
if [[ -f "$out_dir/ca.key" && -f "$out_dir/ca.crt" ]]; then
    echo "kept    $out_dir/ca.crt"
elif [[ -f "$out_dir/ca.key" || -f "$out_dir/ca.crt" ]]; then
    echo "error: only one of ca.key / ca.crt exists in $out_dir; restore the other or" \
         "remove both (every certificate and site then needs the new ca.crt)" >&2
    exit 1
else
    cat >"$tmp/ca.cnf" <<EOF
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca
[dn]
CN = fedprompt pilot CA
O = fedprompt
[v3_ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out "$tmp/ca.key" 2>/dev/null
    openssl req -x509 -new -key "$tmp/ca.key" -sha384 -days "$ca_days" \
        -config "$tmp/ca.cnf" -out "$tmp/ca.crt"
    mv "$tmp/ca.key" "$out_dir/ca.key"
    mv "$tmp/ca.crt" "$out_dir/ca.crt"
    rm -f "$out_dir/server.crt"  # a new CA invalidates the old server certificate
    echo "created $out_dir/ca.crt"
fi

# ---------------------------------------------------------------- SuperLink certificate
server_ok=false
if [[ -f "$out_dir/server.key" && -f "$out_dir/server.crt" && -f "$out_dir/server.san" ]] \
    && [[ "$(cat "$out_dir/server.san")" == "$san" ]] \
    && openssl verify -CAfile "$out_dir/ca.crt" "$out_dir/server.crt" >/dev/null 2>&1 \
    && openssl x509 -in "$out_dir/server.crt" -noout -checkend 86400 >/dev/null; then
    server_ok=true
fi
if $server_ok; then
    echo "kept    $out_dir/server.crt ($san)"
else
    cat >"$tmp/server.cnf" <<EOF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = fedprompt SuperLink
O = fedprompt
[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
subjectAltName = $san
EOF
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out "$tmp/server.key" 2>/dev/null
    openssl req -new -key "$tmp/server.key" -config "$tmp/server.cnf" -out "$tmp/server.csr"
    openssl x509 -req -in "$tmp/server.csr" -CA "$out_dir/ca.crt" -CAkey "$out_dir/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days "$cert_days" -sha384 \
        -extfile "$tmp/server.cnf" -extensions v3_server -out "$tmp/server.crt" 2>/dev/null
    openssl verify -CAfile "$out_dir/ca.crt" "$tmp/server.crt" >/dev/null
    mv "$tmp/server.key" "$out_dir/server.key"
    mv "$tmp/server.crt" "$out_dir/server.crt"
    printf '%s' "$san" >"$out_dir/server.san"
    echo "created $out_dir/server.crt ($san)"
fi
chmod 644 "$out_dir/ca.crt" "$out_dir/server.crt"

# ---------------------------------------------------------------- SuperNode keys
key_dir="$out_dir/supernode-keys"
use_python=false
if [[ "${FEDPROMPT_KEYGEN:-}" == "python" ]] || ! command -v ssh-keygen >/dev/null; then
    use_python=true
fi
if $use_python; then
    python="${PYTHON:-}"
    if [[ -z "$python" ]]; then
        if [[ -x "$script_dir/../.venv/bin/python" ]]; then
            python="$script_dir/../.venv/bin/python"
        else
            python="python3"
        fi
    fi
    "$python" "$script_dir/make_supernode_keys.py" "$key_dir" --count "$num_supernodes"
else
    for ((i = 0; i < num_supernodes; i++)); do
        key="$key_dir/supernode-$i"
        if [[ -f "$key" ]]; then
            [[ -f "$key.pub" ]] || ssh-keygen -y -f "$key" >"$key.pub"
            echo "kept    $key (+ .pub)"
        else
            ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedprompt-supernode-$i" -f "$key"
            echo "created $key (+ .pub)"
        fi
    done
fi
chmod 600 "$key_dir"/supernode-* 2>/dev/null || true
chmod 644 "$key_dir"/supernode-*.pub 2>/dev/null || true
