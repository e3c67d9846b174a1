#!/usr/bin/env bash
# One device call's worth of the open GPU work, by stage (docs/perf-notes.md, "Plan for the next
# device session"). Each stage writes under OUT/<stage>/ and prints a short summary; stages keep
# within about 8 minutes so one call (10-minute limit) runs one or two of them.
#
# Usage: benchmarks/device_round.sh OUT STAGE...
#   verify  the compile fixes (compile_probe, test_compile/transformers/modules) and the GPU tier
#   host    host time per call (host_overhead.py), graph replays at short sequences, small and odd
#           shapes (odd_shapes.py: batch 1, head dims 80/96/192, GQA 8:1)
#   tune    Triton 3.6's resource report, then the tile sweep with the fewest-spill candidates
#   tma     the TMA forward experiment (FLASHLAB_FWD_TMA=1) checked, its tests, and timed beside the
#           standard forward and the SDPA backends
#   decode  first-call time, then decoding (decode_bench.py): eager, as CUDA graph replays, windowed
#   lab     the feature suites not yet measured in full (softcap-alibi, sliding-window fwd+bwd; rerun
#           with a kept OUT and --resume by hand to finish one)
#   dropout-tests  every dropout test on the GPU
#   dropout    round 6's dropout RNG rewrite: the lab's dropout suite
#   attn-mask  the SDPA drop-in with dense masks (and the block mask beside it): the attn-mask suite
#   decode-tune  the decode split-count rule beside its tune (graph replays, B4/16/32 at 8k/32k)
#   bwd-tune     the backward's dK/dV and dQ tile sweep at d64/d128
#   dropout-tune the same sweep with dropout 0.1 at d128, 8k
#   gluon   the Gluon forward (Hopper's default): tests/test_forward_gluon.py, gluon_forward.py, first call
#   gluon-grid kernel_check.py --tl: the grid with flashlab (Gluon kernels) beside flashlab-tl and SDPA
#   gluon-bwd  the Gluon backward (Hopper's default at d128): tests/test_backward_gluon.py, gluon_backward.py
#   fa-grid-gluon  the lab's FlashAttention grid (d64/d128, 2k-16k, fwd) with flashlab-tl and Flex
#   training   issue 5's suite: fwd+bwd and bwd with flashlab-deterministic, GQA 32:8 / 32:1, peak memory
#              (Flex compiles its backward per shape: rerun with the same OUT and --resume to finish)
#   gqa        GQA / MQA backward (32:8, 32:1; d128 4k/8k, d64 4k/16k) beside cuDNN and sdpa-flash, and
#              with FLASHLAB_BWD_GROUP_SPLIT=0
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:?usage: device_round.sh OUT STAGE...}
shift
export PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -z "${FLASHLAB_GIT_COMMIT:-}" ]; then
  FLASHLAB_GIT_COMMIT=$(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo unknown)
  export FLASHLAB_GIT_COMMIT
fi
py=${PYTHON:-python3}
cd "$here" || exit 1

for stage in "$@"; do
  dir="$out/$stage"
  mkdir -p "$dir"
  case "$stage" in
    verify)
      timeout 200 "$py" benchmarks/compile_probe.py --variants base --out "$dir/probe" > "$dir/probe.log" 2>&1 &
      probe=$!
      benchmarks/gpu_tests.sh "$dir/tests" 300
      wait "$probe"
      cat "$dir/probe.log"
      ;;
    host)
      timeout 120 "$py" benchmarks/host_overhead.py --out "$dir" | tail -40
      timeout 200 "$py" benchmarks/kernel_check.py --out "$dir/eager" --seqlens 512 1024 2048 \
        --head-dims 64 128 256 --skip-correctness > "$dir/eager.log" 2>&1
      timeout 120 "$py" benchmarks/kernel_check.py --out "$dir/graph" --seqlens 512 1024 2048 \
        --head-dims 64 128 256 --modes fwd --cudagraph --skip-correctness > "$dir/graph.log" 2>&1
      tail -25 "$dir/eager.log"
      tail -12 "$dir/graph.log"
      timeout 150 "$py" benchmarks/odd_shapes.py --out "$dir/odd" | tail -42
      ;;
    tune)
      KERNEL_COMPILE_PTXAS=1 timeout 120 "$py" tests/kernel_compile.py > "$dir/resources.txt" 2>&1
      grep -c "^ok" "$dir/resources.txt"
      timeout 400 "$py" benchmarks/kernel_check.py --out "$dir" --tune --tune-seqlens 2048 8192 \
        --tune-head-dims 64 128 256 --seqlens 2048 > "$dir/tune.log" 2>&1
      tail -40 "$dir/tune.log"
      ;;
    tma)
      timeout 200 "$py" -m pytest -q -p no:cacheprovider tests/test_forward_tma.py > "$dir/tests.log" 2>&1
      tail -1 "$dir/tests.log"
      timeout 360 "$py" benchmarks/kernel_check.py --out "$dir" --fwd-tma --seqlens 1024 2048 8192 16384 \
        --head-dims 64 128 256 --modes fwd fwd+bwd > "$dir/tma.log" 2>&1
      grep -E "FAIL|correctness" "$dir/tma.log"
      tail -50 "$dir/tma.log"
      ;;
    decode)
      timeout 150 "$py" benchmarks/first_call.py --out "$dir/first-call" | tail -8
      timeout 120 "$py" benchmarks/decode_bench.py --out "$dir/eager" --budget-s 100 --skip-tune \
        > "$dir/eager.log" 2>&1
      timeout 110 "$py" benchmarks/decode_bench.py --out "$dir/graph" --budget-s 90 --skip-tune --cudagraph \
        --skip-correctness > "$dir/graph.log" 2>&1
      timeout 80 "$py" benchmarks/decode_bench.py --out "$dir/window" --budget-s 60 --skip-tune --window 4096 \
        --skip-correctness --batches 1 8 > "$dir/window.log" 2>&1
      grep -iE "fail|error" "$dir"/*.log | head -5
      tail -n 25 "$dir/eager.log" "$dir/graph.log"
      tail -15 "$dir/window.log"
      ;;
    lab)
      # Round 5 ran varlen and block-sparse in full; still open: softcap / ALiBi and the window's fwd+bwd.
      lab=("$py" -m flashlab.lab.cli bench --rep-ms 100)
      timeout 270 "${lab[@]}" --suite softcap-alibi --providers flashlab,flex,sdpa --out "$dir/softcap-alibi" \
        > "$dir/softcap-alibi.log" 2>&1
      timeout 200 "${lab[@]}" --suite sliding-window --providers flashlab,flex,sdpa-cudnn --out "$dir/window" \
        > "$dir/window.log" 2>&1
      tail -n 30 "$dir"/*.log
      ;;
    dropout-tests)
      # Every dropout test (CPU tier and GPU tier) on the GPU.
      timeout 240 "$py" -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/test_philox.py tests/test_features.py \
        tests/test_block_mask.py tests/test_gpu.py tests/test_cpu_path.py -k dropout > "$dir/tests.log" 2>&1
      tail -n 5 "$dir/tests.log"
      ;;
    dropout)
      timeout 200 "$py" -m flashlab.lab.cli bench --rep-ms 50 --suite dropout \
        --providers flashlab,sdpa-flash,sdpa-efficient --out "$dir/dropout" > "$dir/dropout.log" 2>&1
      tail -n 30 "$dir/dropout.log"
      ;;
    attn-mask)
      timeout 280 "$py" -m flashlab.lab.cli bench --rep-ms 50 --suite attn-mask \
        --providers flashlab-sdpa,flashlab,sdpa,sdpa-cudnn --out "$dir/attn-mask" > "$dir/attn-mask.log" 2>&1
      tail -n 30 "$dir/attn-mask.log"
      ;;
    decode-tune)
      # The split-count rule (decode_tiles.choose_num_splits) against its tune, graph replays.
      timeout 150 "$py" benchmarks/decode_bench.py --out "$dir" --budget-s 130 --cudagraph --skip-correctness \
        --batches 4 16 32 --cache-lens 8192 32768 > "$dir/decode.log" 2>&1
      tail -n 30 "$dir/decode.log"
      ;;
    bwd-tune)
      timeout 330 "$py" benchmarks/kernel_check.py --out "$dir" --tune --tune-kinds bwd --tune-head-dims 64 128 \
        --tune-seqlens 2048 8192 --seqlens 2048 --modes fwd+bwd > "$dir/tune.log" 2>&1
      tail -n 40 "$dir/tune.log"
      ;;
    dropout-tune)
      # The backward's tiles with dropout (its dK/dV kernel spills 228 B with the shipped tiles at d128).
      timeout 200 "$py" benchmarks/kernel_check.py --out "$dir" --tune --tune-kinds bwd --tune-head-dims 128 \
        --tune-seqlens 8192 --tune-dropout 0.1 --skip-correctness --seqlens 2048 --head-dims 128 --modes fwd \
        > "$dir/tune.log" 2>&1
      grep tune-bwd "$dir/tune.log"
      ;;
    gluon-grid)
      # The standard grid tool: flashlab (the Gluon kernels in their scope) beside its `tl` kernels and SDPA.
      timeout 420 "$py" benchmarks/kernel_check.py --out "$dir" --tl --seqlens 2048 4096 8192 16384 \
        --head-dims 64 128 > "$dir/grid.log" 2>&1
      grep -E "FAIL|correctness" "$dir/grid.log"
      tail -n 36 "$dir/grid.log"
      ;;
    gluon-bwd)
      # Issue 5: the Gluon backward: its tests, then checked and timed.
      timeout 200 "$py" -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/test_backward_gluon.py \
        > "$dir/tests.log" 2>&1
      tail -n 3 "$dir/tests.log"
      timeout 300 "$py" benchmarks/gluon_backward.py --out "$dir" 2>&1 | tee "$dir/gluon_backward.log" | tail -16
      ;;
    fa-grid-gluon)
      # Issue 4's grid: flashlab (Gluon) and its `tl` kernels beside every peer, FlexAttention included (one compile a
      # shape: forward only fits a call; rerun with the same OUT and --resume to finish).
      timeout 480 "$py" -m flashlab.lab.cli bench --tokens 16384 --seqlen 2048,4096,8192,16384 --embed 2048 \
        --head-dim 64,128 --causal both --dtypes fp16 --modes fwd --rep-ms 50 \
        --providers flashlab,flashlab-tl,sdpa-flash,sdpa-cudnn,flex --out "$dir/grid" > "$dir/grid.log" 2>&1
      tail -n 40 "$dir/grid.log"
      ;;
    training)
      timeout 520 "$py" -m flashlab.lab.cli bench --suite training --rep-ms 50 --out "$dir/training" \
        > "$dir/training.log" 2>&1
      tail -n 40 "$dir/training.log"
      ;;
    gqa)
      # Issue 5's GQA / MQA backward beside the peers, and with the group split off (group_split.py).
      gqa=("$py" -m flashlab.lab.cli bench --batch 1 --heads 32 --kv-heads 8,1 --causal both --modes bwd
           --dtypes bf16 --rep-ms 40)
      for d in 128 64; do
        s=4096,8192; [ "$d" = 64 ] && s=4096,16384
        timeout 120 "${gqa[@]}" --seqlen "$s" --head-dim "$d" --providers flashlab,sdpa-cudnn,sdpa-flash \
          --out "$dir/d$d" > "$dir/d$d.log" 2>&1
        FLASHLAB_BWD_GROUP_SPLIT=0 timeout 80 "${gqa[@]}" --seqlen "$s" --head-dim "$d" --providers flashlab \
          --out "$dir/d${d}-unsplit" > "$dir/d${d}-unsplit.log" 2>&1
        grep -A11 "backward time" "$dir/d$d/report.md"
        grep -A11 "backward time" "$dir/d${d}-unsplit/report.md"
      done
      ;;
    gluon)
      # The package's Gluon forward: its tests, then checked and timed.
      timeout 200 "$py" -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/test_forward_gluon.py \
        > "$dir/tests.log" 2>&1
      tail -n 3 "$dir/tests.log"
      timeout 300 "$py" benchmarks/gluon_forward.py --out "$dir" 2>&1 | tee "$dir/gluon.log" | tail -14
      # Issue 4's first-call time with the Gluon forward (d128, 1k tokens: inside its scope).
      timeout 120 "$py" benchmarks/first_call.py --head-dims 128 --out "$dir/first-call" | tail -4
      ;;
    *)
      echo "unknown stage: $stage (verify, host, tune, tma, decode, dropout-tests, decode-tune, bwd-tune, dropout-tune, lab, dropout, attn-mask, gluon, gluon-grid, gluon-bwd, fa-grid-gluon, training, gqa)"
      exit 2
      ;;
  esac
done
# What comes back from a device call is at most 8 files two folders down: pack everything.
tar czf "$out/round.tgz" -C "$out" "$@" && echo "packed: $out/round.tgz" && for stage in "$@"; do rm -rf "${out:?}/$stage"; done
