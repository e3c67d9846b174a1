"""The Gluon forward (issue 4; src/flashlab/kernels/forward_gluon.py, opt-in FLASHLAB_FWD_GLUON=1):
compile it for sm_90 without a GPU, or check it through flashlab's API and time it beside the
standard forward and SDPA's flash / cuDNN backends on the FlashAttention grid.

The experiments that led to it (a cp.async kernel, one 8-warp consumer, the order ptxas serializes)
are in docs/perf-notes.md, round 8, with their results in benchmarks/results/h200-2026-12-02b/.

Usage:
  PYTHONPATH=src python3 benchmarks/gluon_forward.py --compile-only   # no GPU (Triton 3.6)
  PYTHONPATH=src python3 benchmarks/gluon_forward.py --out DIR         # GPU: check, then time
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton

import flashlab.gluon_forward as gluon_host

STAGE_VARIANTS = (3, 2)  # ring depths timed (the shipped one first)


def wgmma_serialized(ptx: str) -> bool:
    """Whether ptxas serializes the kernel's wgmma (its note C7514): the overlap is then gone."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        report = subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", f"{tmp}/k.ptx", "-o", f"{tmp}/k.o"],
                                capture_output=True, text=True).stderr
    return "C7514" in report


def compile_report(kernel, consts: dict, blocks: dict[str, list[int]], ty: str, types: dict[str, str]) -> str:
    """Compile a Gluon ``kernel`` for sm_90 as a launch specializes it — the arguments in ``blocks``
    as tensor descriptors of those block shapes and dtype ``ty`` (fp16 / bf16), the others typed by
    ``types`` or i32 — with num_warps 4 and the Gluon kernels' register cap; returns shared memory,
    the setmaxnreg values, ptxas's registers and spills, and its wgmma-serialization note."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from kernel_compile import ptxas_resources

    torch_ty, gl_ty = (torch.float16, gl.float16) if ty == "fp16" else (torch.bfloat16, gl.bfloat16)
    names = list(kernel.arg_names)
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in blocks:  # the string a launch specializes a TensorDescriptor to
            layout = gl.NVMMASharedLayout.get_default_for(blocks[n], gl_ty)
            sig[n] = mangle_type(TensorDescriptor.from_tensor(torch.empty(1024, 1024, dtype=torch_ty), blocks[n],
                                                              layout))
        else:
            sig[n] = types.get(n, "i32").replace("{ty}", ty)
    src = GluonASTSource(kernel, sig, {(names.index(n),): v for n, v in consts.items()}, {})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4, "maxnreg": gluon_host.MAXNREG})
    ptx = compiled.asm["ptx"]
    regs = sorted({int(n) for n in re.findall(r"setmaxnreg[.a-z]*[.]u32\s*(\d+)", ptx)})
    serialized = " WGMMA SERIALIZED (ptxas C7514)" if wgmma_serialized(ptx) else ""
    return f"shared {compiled.metadata.shared} B, setmaxnreg {regs}, {ptxas_resources(ptx, 90)}{serialized}"


def compile_only() -> None:
    """Compile the forward for sm_90 as a launch specializes it, each head dim, ring depth and mask."""
    from flashlab.kernels.forward_gluon import attn_fwd_gluon_kernel

    block_m, block_n = gluon_host.BLOCK_M, gluon_host.BLOCK_N
    for head_dim, stages, (ty, causal) in itertools.product((64, 128), STAGE_VARIANTS,
                                                            (("fp16", False), ("bf16", True))):
        blocks = {"q_desc": [block_m // 2, head_dim], "k_desc": [block_n, head_dim], "v_desc": [block_n, head_dim]}
        consts = {"HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n, "STAGES": stages, "CAUSAL": causal}
        report = compile_report(attn_fwd_gluon_kernel, consts, blocks, ty,
                                {"Out": "*{ty}", "LSE": "*fp32", "qk_scale": "fp32"})
        print(f"d{head_dim} {ty} {'causal' if causal else 'full'} stages {stages}: {report}", flush=True)


def check(rows: list[dict]) -> bool:
    """flashlab's API with FLASHLAB_FWD_GLUON=1 on shapes the kernel takes: poisoned outputs, the
    accuracy rule on the output and gradients (the backward reads the kernel's LSE), and the launch
    must really have been the Gluon one."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from attn_checks import check_against_reference, make_qkv

    import flashlab
    from flashlab import ops

    calls = []
    real = ops.launch_fwd_gluon
    ops.launch_fwd_gluon = lambda *a, **kw: (calls.append(1), real(*a, **kw))
    ok = True
    try:
        for stages in STAGE_VARIANTS:
            gluon_host.STAGES = stages
            for batch, sq, sk, heads, kv_heads, head_dim, dtype, causal in [
                    (2, 1024, 1024, 8, 8, 128, torch.bfloat16, False), (2, 1024, 1024, 8, 8, 128, torch.float16, True),
                    (1, 1100, 1100, 6, 2, 128, torch.bfloat16, True), (3, 1030, 2049, 4, 1, 128, torch.float16, False),
                    (1, 4096, 4096, 8, 2, 64, torch.float16, False), (1, 4100, 4100, 4, 1, 64, torch.bfloat16, True)]:
                torch.manual_seed(sq + sk + head_dim)
                q, k, v = make_qkv(batch, sq, sk, heads, kv_heads, head_dim, dtype, "cuda")
                calls.clear()
                try:
                    out = flashlab.flash_attn_func(q, k, v, causal=causal)
                    check_against_reference(out, q, k, v, causal=causal)
                    passed, detail = calls == [1], "ok" if calls == [1] else "the Gluon kernel did not run"
                except AssertionError as exc:
                    passed, detail = False, str(exc)
                ok &= passed
                rows.append({"kind": "check", "stages": stages, "shape": [batch, sq, sk, heads, kv_heads, head_dim],
                             "dtype": str(dtype), "causal": causal, "ok": passed, "detail": detail})
                print("check", "PASS" if passed else "FAIL", rows[-1], flush=True)
    finally:
        ops.launch_fwd_gluon = real
        gluon_host.STAGES = STAGE_VARIANTS[0]
    return ok


def time_grid(rows: list[dict]) -> None:
    """TFLOP/s of the forward on the FlashAttention grid (16k tokens, heads × dim = 2048), fp16."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import flashlab

    def with_gluon(fn, stages):
        def run():
            os.environ["FLASHLAB_FWD_GLUON"], gluon_host.STAGES = "1", stages
            try:
                return fn()
            finally:
                os.environ["FLASHLAB_FWD_GLUON"], gluon_host.STAGES = "0", STAGE_VARIANTS[0]
        return run

    for head_dim, causal, seqlen in itertools.product((64, 128), (False, True), (1024, 4096, 16384)):
        heads, batch = 2048 // head_dim, 16384 // seqlen
        q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.float16) for _ in range(3))
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        flops = 4 * batch * heads * seqlen * seqlen * head_dim // (2 if causal else 1)
        standard = lambda q=q, k=k, v=v, c=causal: flashlab.flash_attn_func(q, k, v, causal=c)  # noqa: E731
        fns = {f"gluon-s{s}": with_gluon(standard, s) for s in STAGE_VARIANTS}
        fns["flashlab"] = standard
        for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
            def sdpa(backend=backend, qt=qt, kt=kt, vt=vt, c=causal):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=c)
            fns[name] = sdpa
        line = {}
        for name, fn in fns.items():
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            line[name] = flops / ms / 1e9
            rows.append({"kind": "time", "provider": name, "d": head_dim, "causal": causal, "seqlen": seqlen,
                         "ms": ms, "tflops": line[name]})
        best = line[f"gluon-s{STAGE_VARIANTS[0]}"]
        print(f"d{head_dim} {'causal' if causal else 'full'} seqlen {seqlen}: "
              + "  ".join(f"{n} {t:.0f}" for n, t in line.items())
              + f"  gluon / flashlab {best / line['flashlab']:.2f}x, / cudnn {best / line['sdpa-cudnn']:.2f}x",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("gluon-forward"))
    args = ap.parse_args()
    if args.compile_only:
        compile_only()
        return
    rows: list[dict] = [{"kind": "env", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                         "triton": triton.__version__, "cudnn": torch.backends.cudnn.version()}]
    passed = check(rows)
    if passed:
        time_grid(rows)
    else:
        print("correctness FAILED: not timed")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gluon_forward.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
