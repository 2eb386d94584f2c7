#!/usr/bin/env bash
# Every GPU figure of plamo_jax in one go (issue 18), sized for one H200 in under 8 minutes:
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# Runs benchmarks/bench_gpu.py: the kernel checks, then each family's training steps in its own process
# (a hung or failing family costs only its own time limit), then the report (OUT_DIR/gpu_check.md).
# Wheels in .whl/ (packages the GPU image lacks: grain, ml-collections, ...) are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# Leave room for cuDNN / cuBLAS workspaces beside XLA's pool (the default fraction is 0.75).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
start=$SECONDS
timeout 90 python3 benchmarks/bench_gpu.py checks --out "$out"
echo "checks: rc=$? after $((SECONDS - start)) s"
for family_limit in dense:150 hybrid:120 moe:90; do
  family=${family_limit%%:*}
  timeout "${family_limit##*:}" python3 benchmarks/bench_gpu.py family "$family" --out "$out"
  echo "family $family: rc=$? after $((SECONDS - start)) s"
done
python3 benchmarks/bench_gpu.py report --out "$out"
