#!/usr/bin/env bash
# Creates the tinygrad worker's Python environment, worker/.venv, and prints its python.
# egpud runs `<that python> -m egpu_worker.serve` for `--backend tinygrad` (see worker/README.md).
# Idempotent: re-run after pulling; it reinstalls only when worker/pyproject.toml changed.
#
#   scripts/setup-worker.sh            # uses python3 (tinygrad 0.14 needs Python >= 3.11)
#   PYTHON=python3.12 scripts/setup-worker.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=worker/.venv
python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "setup-worker: $python is $("$python" --version 2>&1); tinygrad 0.14 needs Python >= 3.11" >&2
  exit 1
}
stamp="$venv/.installed-$(sha256sum worker/pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  rm -rf "$venv"
  "$python" -m venv "$venv"
  PIP_ROOT_USER_ACTION=ignore "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -e "worker[test]" >&2
  touch "$stamp"
fi
echo "$root/$venv/bin/python"
