#!/usr/bin/env bash
# Runs the engine's tests built for arm64 Linux under qemu-user: the arm64 code paths (the NEON
# `sdot` tile that the Mac's CPU backend runs, qemu's CPU having the dot product extension, and
# the portable kernels it shares the rest with and is checked against bit for bit) checked
# on this x86-64 machine, with the same real model files and references as the native run.
# Not part of CI (a cross toolchain and an emulated run take ~30 minutes on 2 cores); run it
# by hand after kernel changes. Timings under emulation mean nothing; only results do.
#
#   scripts/test-arm64.sh [cargo test args, e.g. --lib or --test agreement_llamacpp]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
target=aarch64-unknown-linux-gnu
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd=sudo
    $sudo_cmd apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q gcc-aarch64-linux-gnu qemu-user
fi
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
scripts/fetch-models.sh >/dev/null
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo test -p egpu-engine --locked --target "$target" "$@"
