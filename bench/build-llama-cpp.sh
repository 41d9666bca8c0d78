#!/usr/bin/env bash
# Builds llama.cpp tools from the llama.cpp source that llama-cpp-python's PyPI sdist vendors
# (the same llama.cpp that bench.py otherwise runs in-process), for this CPU (GGML_NATIVE).
# cmake and ninja come from PyPI too. Prints the folder the binaries are in.
#
#   bench/build-llama-cpp.sh [build-dir] [target ...]   (default: target/llama-bench, llama-bench llama-server)
#
# With LLAMA_CPU=avx2 (x86-64 only) it builds instead for a machine with AVX2, FMA, F16C and BMI2
# but no AVX-512, in build-dir/build-avx2: llama.cpp as it runs on the AVX2-only machines most
# users have, the fair partner for egpu's EGPU_KERNELS=avx2 column on a machine that has AVX-512.
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
cpu_flags=(-DGGML_NATIVE=ON)
build="$out/build"
if [ "$(uname -m)" = x86_64 ]; then
    cpu_flags+=(-DCMAKE_C_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
                -DCMAKE_CXX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
fi
case "${LLAMA_CPU:-native}" in
    native) ;;
    avx2)
        [ "$(uname -m)" = x86_64 ] || { echo "LLAMA_CPU=avx2 needs an x86-64 machine" >&2; exit 2; }
        # Without GGML_NATIVE ggml compiles only the instruction sets named here (AVX-512 is off
        # by default), and its run-time checks then keep to them.
        cpu_flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
                   -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF)
        build="$out/build-avx2"
        ;;
    *) echo "LLAMA_CPU must be native or avx2, not ${LLAMA_CPU}" >&2; exit 2 ;;
esac
# The server is built without TLS or curl: it serves loopback and reads a local file.
cmake -S "$out/src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON "${cpu_flags[@]}" >&2
cmake --build "$build" --target "${targets[@]}" -j "$(nproc)" >&2
echo "$build/bin"
