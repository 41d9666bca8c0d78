#!/usr/bin/env bash
# Installs the Python clients the end-to-end tests drive into <repo>/.pydeps, without
# touching the system Python, and prints that folder: grpcio (with its code generator and the
# reflection client) for the gRPC example client; the official `openai` and `ollama` packages
# and `prometheus-client` (its text-format parser) for the HTTP front end's tests, and
# `jsonschema` to validate constrained output.
# Run them with PYTHONPATH set to it (scripts/test.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
target=.pydeps
stamp="$target/.installed-3"
if [ ! -f "$stamp" ]; then
  rm -rf "$target"
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-warn-conflicts --target "$target" \
    grpcio==1.85.1 grpcio-tools==1.85.1 grpcio-reflection==1.85.1 \
    openai==3.63.0 ollama==0.6.3 prometheus-client==0.26.0 jsonschema==4.26.0 >&2
  touch "$stamp"
fi
echo "$PWD/$target"
