#!/usr/bin/env bash
# Installs the test tools this project needs into target/tools (nothing system-wide):
#   - a Python venv with grpcio + grpcio-reflection (runs the README walk-through via reflection),
#     kubernetes-validate and yamllint (check the Kubernetes manifests offline)
#   - buf from npm (lints the protos)
# Idempotent: a second run only checks that they are there.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="$PWD/target/tools"
mkdir -p "$TOOLS"

if [ ! -x "$TOOLS/venv/bin/kubernetes-validate" ] || [ ! -x "$TOOLS/venv/bin/yamllint" ] \
  || ! "$TOOLS/venv/bin/python" -c 'import grpc_reflection, grpc_health' 2>/dev/null; then
  echo "installing Python tools into $TOOLS/venv" >&2
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check \
    'grpcio==1.85.1' 'grpcio-reflection==1.85.1' 'grpcio-health-checking==1.85.1' 'protobuf==7.36.2' \
    'kubernetes-validate==1.37.0' 'yamllint==1.38.0'
fi

if [ ! -x "$TOOLS/node/node_modules/.bin/buf" ]; then
  echo "installing buf into $TOOLS/node" >&2
  npm install --silent --no-audit --no-fund --prefix "$TOOLS/node" '@bufbuild/buf@1.75.0' >&2
fi
