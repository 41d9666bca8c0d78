#!/usr/bin/env bash
# Builds llama.cpp's llama-bench from the llama.cpp source that llama-cpp-python's PyPI sdist
# vendors (the same llama.cpp that bench.py otherwise runs in-process), for this CPU
# (GGML_NATIVE). cmake and ninja come from PyPI too. Prints the binary's path.
#
#   bench/build-llama-bench.sh [build-dir]      (default: target/llama-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.3.36
out="$(mkdir -p "${1:-target/llama-bench}" && cd "${1:-target/llama-bench}" && pwd)"
if [ ! -x "$out/venv/bin/cmake" ]; then
    python3 -m venv "$out/venv"
    "$out/venv/bin/pip" install -q cmake ninja >&2
fi
if [ ! -d "$out/src" ]; then
    "$out/venv/bin/pip" download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$out/sdist" >&2
    tar -xzf "$out/sdist/llama_cpp_python-$version.tar.gz" -C "$out"
    mv "$out/llama_cpp_python-$version/vendor/llama.cpp" "$out/src"
    rm -rf "$out/llama_cpp_python-$version"
fi
export PATH="$out/venv/bin:$PATH"
cmake -S "$out/src" -B "$out/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON >&2
cmake --build "$out/build" --target llama-bench -j "$(nproc)" >&2
echo "$out/build/bin/llama-bench"
