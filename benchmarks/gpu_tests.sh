#!/usr/bin/env bash
# The GPU test tier in parallel shards: each test spends most of its time compiling kernels (one
# CPU core each), so several pytest processes on one GPU finish the tier in a fraction of the time.
# Also runs the CPU-tier kernel tests on the GPU (their `device` fixture picks CUDA when present).
#
# Usage: benchmarks/gpu_tests.sh [LOG_DIR] [TIMEOUT_S]     (defaults: gpu-test-logs, 540)
# Prints one summary line per shard; exits non-zero if any shard failed or timed out.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
logs=${1:-gpu-test-logs}
limit=${2:-540}
mkdir -p "$logs"
export PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
cd "$here"

pids=()
names=()
shard() {  # shard NAME PYTEST_ARGS...: one pytest process in the background, its log in $logs/NAME.log
  local name=$1
  shift
  timeout "$limit" "$py" -m pytest -q -rfE -p no:cacheprovider "$@" >"$logs/$name.log" 2>&1 &
  pids+=($!)
  names+=("$name")
}
shard gpu-real-sizes tests/test_gpu.py -k real_sizes
shard gpu-rest tests/test_gpu.py -k "not real_sizes"
shard gpu-kvcache-dist-compile -m gpu tests/test_kvcache.py tests/test_distributed.py tests/test_compile.py
shard gpu-mask-hf-model -m gpu tests/test_block_mask.py tests/test_transformers.py tests/test_model_bench.py
shard kernels-on-gpu -m "not gpu" tests/test_kernels.py
shard features-mask-on-gpu -m "not gpu" tests/test_features.py tests/test_block_mask.py
shard kvcache-modules-on-gpu -m "not gpu" tests/test_kvcache.py tests/test_kvcache_rotary.py tests/test_modules.py tests/test_compile.py \
  tests/test_transformers.py
shard philox-cpu-path tests/test_philox.py tests/test_cpu_path.py tests/test_interface_errors.py
shard packed-tma-launch-on-gpu tests/test_packed.py tests/test_forward_tma.py tests/test_forward_gluon.py \
  tests/test_launch.py tests/test_launch_plans.py
shard gluon-backward tests/test_backward_gluon.py tests/test_backward_gluon_fused.py tests/test_group_split.py

status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  rc=$?
  [ "$rc" -ne 0 ] && status=1
  summary=$(grep -E "passed|failed|error" "$logs/${names[$i]}.log" | tail -1)
  [ "$rc" -eq 124 ] && summary="TIMED OUT after ${limit}s: $(tail -c 160 "$logs/${names[$i]}.log" | tr "\n" " ")"
  printf '%-26s rc=%-3s %s\n' "${names[$i]}" "$rc" "$summary"
done
exit $status
