#!/usr/bin/env bash
# Builds llama.cpp's llama-bench (see build-llama-cpp.sh) and prints the binary's path.
#
#   bench/build-llama-bench.sh [build-dir]      (default: target/llama-bench)
set -euo pipefail
bin="$("$(dirname "$0")/build-llama-cpp.sh" "${1:-target/llama-bench}" llama-bench)"
echo "$bin/llama-bench"
