#!/usr/bin/env bash
# Builds llama.cpp tools from the llama.cpp source that llama-cpp-python's PyPI sdist vendors
# (the same llama.cpp that bench.py otherwise runs in-process), for this CPU (GGML_NATIVE).
# cmake and ninja come from PyPI too. Prints the folder the binaries are in.
#
#   bench/build-llama-cpp.sh [build-dir] [target ...]   (default: target/llama-bench, llama-bench llama-server)
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.3.36
out="$(mkdir -p "${1:-target/llama-bench}" && cd "${1:-target/llama-bench}" && pwd)"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(llama-bench llama-server)
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
# GGML_NATIVE turns on AMX where the CPU reports it, but VMs that report AMX do not always give
# processes its tile state, and llama.cpp's AMX kernels then crash; x86 builds leave AMX out.
native_flags=()
if [ "$(uname -m)" = x86_64 ]; then
    native_flags=(-DCMAKE_C_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
                  -DCMAKE_CXX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
fi
# The server is built without TLS or curl: it serves loopback and reads a local file.
cmake -S "$out/src" -B "$out/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON "${native_flags[@]}" >&2
cmake --build "$out/build" --target "${targets[@]}" -j "$(nproc)" >&2
echo "$out/build/bin"
