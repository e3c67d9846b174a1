#!/usr/bin/env bash
# The lab on a CUDA GPU: list providers, measure the device's ceilings, run the seed study at full
# scale (batch 16/32/64 x seqlen 512/1024/2048, 32 heads, embedding 2048, fp16) without and with a
# 16 GiB memory cap (the seed's small-GPU OOM, reproduced on an 80 GB card), then the layer scope.
# Each study takes about 3 minutes on an H100 (measured: 2 min 47 s with the cap).
#
# Usage: benchmarks/lab_gpu_smoke.sh [OUT_ROOT]        (default: benchmarks/results)
# Works from a checkout without installing: the package is taken from src/.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
root=${1:-$here/benchmarks/results}
export PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -z "${FLASHLAB_GIT_COMMIT:-}" ] && git -C "$here" rev-parse HEAD >/dev/null 2>&1; then
  FLASHLAB_GIT_COMMIT=$(git -C "$here" rev-parse HEAD); export FLASHLAB_GIT_COMMIT
fi
py=${PYTHON:-python3}
lab() { "$py" -m flashlab.lab.cli "$@"; }

"$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible to torch")'
lab providers
lab env
lab study seed --out "$root/seed-h100"
lab study seed --memory-cap 16 --out "$root/seed-h100-cap16"
lab study seed --scope layer --out "$root/seed-h100-layer"
echo "reports: $root/seed-h100{,-cap16,-layer}/report.md"
