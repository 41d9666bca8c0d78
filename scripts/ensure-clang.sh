#!/usr/bin/env bash
# The tinygrad worker's DEV=CPU backend (what tests and CI run) compiles its kernels with
# clang. Installs it with apt when it is missing (as root, or through sudo).
set -euo pipefail
if command -v clang >/dev/null; then exit 0; fi
if ! command -v apt-get >/dev/null; then
  echo "clang is missing and there is no apt-get here: install clang (tinygrad's DEV=CPU needs it)" >&2
  exit 1
fi
sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
echo "installing clang (apt) for tinygrad's DEV=CPU" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >&2
$sudo apt-get install -y -qq clang >&2
