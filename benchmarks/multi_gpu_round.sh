#!/usr/bin/env bash
# Issue 10 on a multi-GPU kind (nvidia-h200-x2/-x4/-x8), one device call: ring attention's
# correctness at a size one GPU also runs, then weak scaling (32k tokens per GPU) and strong scaling
# (128k tokens in all), causal and not, ring vs all-gather (flashlab.distributed.bench).
# NVLink multicast stays off (KINDS.md): a program that uses it can take the host's GPUs down.
#
# Usage: benchmarks/multi_gpu_round.sh OUT
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:?usage: multi_gpu_round.sh OUT}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$here" || exit 1
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
echo "GPUs: $gpus"
run=(torchrun --standalone --nproc-per-node "$gpus")
timeout 150 "${run[@]}" -m flashlab.distributed.check --json "$out/ring-check.json" > "$out/ring-check.log" 2>&1
grep -E "passed|ok=False" "$out/ring-check.log"
bench=("${run[@]}" -m flashlab.distributed.bench --heads 32 --kv-heads 8 --head-dim 128 --reps 5)
for causal in "" "--causal"; do
  tag=${causal:+causal}
  timeout 150 "${bench[@]}" --seqlen $((32768 * gpus)) $causal --json "$out/weak${tag:+-$tag}.json" \
    > "$out/weak${tag:+-$tag}.log" 2>&1
  timeout 120 "${bench[@]}" --seqlen 131072 $causal --json "$out/strong${tag:+-$tag}.json" \
    > "$out/strong${tag:+-$tag}.log" 2>&1
done
for log in "$out"/weak*.log "$out"/strong*.log; do echo "== $log"; tail -n 12 "$log"; done
