#!/usr/bin/env bash
# Installs the test tools this project needs into target/tools (nothing system-wide):
#   - a Python venv with grpcio + grpcio-reflection (runs the README walk-through via reflection),
#     grpcio-tools + grpcio-status (the Python example client: stubs and error details),
#     openai (the official OpenAI client: the gateway test talks to smg with it),
#     kubernetes-validate and yamllint (check the Kubernetes manifests offline)
#   - from npm: buf (lints the protos, checks for breaking changes), and @grpc/grpc-js,
#     @grpc/proto-loader and google-proto-files (the Node example client)
#   - a second Python venv, target/tools/gateway, with the Shepherd Model Gateway (`smg`, a real
#     OpenAI-compatible gateway that routes to gRPC engines): its own venv, because smg pins its
#     own grpcio and must not move the tools venv's.
#   - promtool (lints the services' /metrics), unpacked from Debian's prometheus package without
#     installing it (no service, no user, nothing outside target/tools)
# Idempotent: a second run only checks that they are there.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="$PWD/target/tools"
mkdir -p "$TOOLS"

if [ ! -x "$TOOLS/venv/bin/kubernetes-validate" ] || [ ! -x "$TOOLS/venv/bin/yamllint" ] \
  || ! "$TOOLS/venv/bin/python" -c 'import grpc_reflection, grpc_health, grpc_tools, grpc_status, openai' 2>/dev/null; then
  echo "installing Python tools into $TOOLS/venv" >&2
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check \
    'grpcio==1.85.1' 'grpcio-reflection==1.85.1' 'grpcio-health-checking==1.85.1' 'protobuf==7.36.2' \
    'grpcio-tools==1.85.1' 'grpcio-status==1.85.1' 'openai==3.63.0' \
    'kubernetes-validate==1.37.0' 'yamllint==1.38.0'
fi

if [ ! -x "$TOOLS/gateway/bin/smg" ]; then
  echo "installing the smg gateway into $TOOLS/gateway" >&2
  python3 -m venv "$TOOLS/gateway"
  "$TOOLS/gateway/bin/pip" install --quiet --disable-pip-version-check 'smg==1.13.0'
fi

if [ ! -x "$TOOLS/node/node_modules/.bin/buf" ] || [ ! -d "$TOOLS/node/node_modules/@grpc/grpc-js" ] \
  || [ ! -d "$TOOLS/node/node_modules/google-proto-files" ]; then
  echo "installing buf and the Node client's modules into $TOOLS/node" >&2
  npm install --silent --no-audit --no-fund --prefix "$TOOLS/node" '@bufbuild/buf@1.75.0' \
    '@grpc/grpc-js@1.14.7' '@grpc/proto-loader@0.8.1' 'google-proto-files@6.0.1' >&2
fi

if [ ! -x "$TOOLS/promtool/usr/bin/promtool" ]; then
  echo "fetching promtool into $TOOLS/promtool" >&2
  download="$(mktemp -d)"
  (cd "$download" && { apt-get download prometheus >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && apt-get download prometheus >/dev/null 2>&1; }; })
  dpkg-deb -x "$download"/prometheus_*.deb "$TOOLS/promtool"
  rm -rf "$download"
fi
