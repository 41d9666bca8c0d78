#!/usr/bin/env bash
# The tinygrad worker on a GPU: the mat-vec layout sweep, its tests on that device, then decode speed on random-weight
# models of real shapes (SmolLM2-135M Q4_1, LLaMA-3.1-8B Q4_K), batch 1 and 4, and kernels
# per decode step. Optionally (EGPUD=path to a release egpud) the daemon-level comparison
# with the native CPU engine on the same machine (bench/tinygrad_bench.py).
#
#   DEV=CUDA bench/gpu_check.sh [OUT_DIR]          (DEV=NV, DEV=AMD, DEV=PCI+AMD likewise)
#
# Needs a Python >= 3.11 with numpy, tinygrad 0.14.0, grpcio, grpcio-tools and pytest
# ($EGPU_WORKER_PYTHON, else python3; worker/.venv has them all). Everything goes to stdout
# and OUT_DIR/gpu-check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check}
mkdir -p "$out"
py=$(command -v "${EGPU_WORKER_PYTHON:-python3}")
export DEV=${DEV:-CUDA}
export PYTHONPATH="$PWD/worker${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-$(mktemp -d)}
models=$(mktemp -d)
ids=504,3575,282,4649,314,253,1767,2470
step() { echo; echo "== $* ($(date +%T))"; }
{
  step "device"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  "$py" -c 'import tinygrad, sys; print("python", sys.version.split()[0], "tinygrad", tinygrad.__version__)'
  step "probe (DEV=$DEV)"
  timeout 120 "$py" -m egpu_worker.probe
  step "mat-vec layouts (egpu_worker/matvec.py): tinygrad's own schedule vs candidates"
  timeout 400 "$py" bench/matvec_sweep.py --timeout 40 --json "$out/matvec-sweep.json" 2>&1 | sed -n '/per shape/,$p'
  step "synthetic models"
  "$py" -m egpu_worker.synth "$models/smollm2-q4_1.gguf" --type Q4_1 --shape smollm2
  "$py" -m egpu_worker.synth "$models/llama8b-q4_k.gguf" --type Q4_K --shape llama8b
  ls -la "$models"
  for m in smollm2-q4_1 llama8b-q4_k; do
    for b in 1 4; do
      step "decode $m, batch $b"
      timeout 150 "$py" -m egpu_worker.generate "$models/$m.gguf" --ids "$ids" -n 48 --batch "$b" --ctx 256 2>&1 | tail -3
    done
  done
  if [ -n "${EGPUD:-}" ]; then
    step "egpud: tinygrad vs the native CPU engine ($(nproc) threads)"
    timeout 300 python3 bench/tinygrad_bench.py --model "$models/smollm2-q4_1.gguf" --egpud "$EGPUD" \
      --worker-python "$py" --threads "$(nproc)" --reps 2 --gen 64 --streams 4
  fi
  step "worker tests on DEV=$DEV"
  (cd worker && timeout 300 "$py" -m pytest -q -x -p no:cacheprovider tests/test_quant.py tests/test_model_batch.py \
     tests/test_model_archs.py 2>&1 | tail -4)
} 2>&1 | tee "$out/gpu-check.log"
