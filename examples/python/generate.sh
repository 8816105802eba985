#!/usr/bin/env bash
# Generates the Python stubs of proto/ with grpcio-tools into OUT (default target/examples/python):
# python -m grpc_tools.protoc bundles protoc and the google/protobuf imports, so nothing else is
# needed. Generated code is not committed.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-target/examples/python}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
"$PYTHON" -m grpc_tools.protoc -I proto --python_out="$OUT" --grpc_python_out="$OUT" \
  proto/memory/v1/memory.proto proto/runtime/v1/runtime.proto
echo "$OUT"
