#!/usr/bin/env bash
# Installs the Python client's dependencies (grpcio, its code generator and the reflection
# client) into <repo>/.pydeps, without touching the system Python, and prints that folder.
# Run the client with PYTHONPATH set to it (scripts/test.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
target=.pydeps
stamp="$target/.installed-1.85.1"
if [ ! -f "$stamp" ]; then
  rm -rf "$target"
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --target "$target" \
    grpcio==1.85.1 grpcio-tools==1.85.1 grpcio-reflection==1.85.1 >&2
  touch "$stamp"
fi
echo "$PWD/$target"
