"""The Gluon forward (issue 4; src/flashlab/kernels/forward_gluon.py, Hopper's default in its scope):
compile it for sm_90 without a GPU, or check each tile variant against the reference and time it
beside flashlab's portable `tl` forward and SDPA's flash / cuDNN backends on the FlashAttention grid.
Variants are launched directly (gluon_forward.launch_fwd_gluon), so tiles other than the shipped
ones are measured too; the API path is tests/test_forward_gluon.py's and kernel_check.py's.

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
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton

import flashlab.gluon_forward as gluon_host

# head dim -> (keys a block, ring stages) variants, the shipped one first (64 × 4: round 9's
# candidates for d64 at 2k–8k and d128 at 2k, behind cuDNN there).
VARIANTS = {64: [gluon_host.TILES[64], (128, 2), (64, 4)], 128: [gluon_host.TILES[128], (128, 2), (64, 4)],
            256: [gluon_host.TILES[256], (64, 2)]}


def gluon_direct(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, tiles: tuple[int, int],
                 poison: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the Gluon forward launched directly (no scope check) for (batch, seqlen, heads,
    dim) CUDA tensors; ``poison`` fills the outputs with NaN first, so an unwritten element fails."""
    batch, seqlen_q, heads, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, seqlen_q, device=q.device, dtype=torch.float32)
    if poison:
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    gluon_host.launch_fwd_gluon(q, k, v, out, lse, (heads * seqlen_q, seqlen_q), q.shape[-1] ** -0.5, causal,
                                tiles=tiles)
    return out, lse


def wgmma_serialized(ptx: str) -> bool:
    """Whether ptxas serializes the kernel's wgmma (its note C7514): the overlap is then gone."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        report = subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", f"{tmp}/k.ptx", "-o", f"{tmp}/k.o"],
                                capture_output=True, text=True).stderr
    return "C7514" in report


def compile_report(kernel, consts: dict, blocks: dict[str, list[int]], ty: str, types: dict[str, str],
                   divisible: tuple[str, ...] = ()) -> str:
    """Compile a Gluon ``kernel`` for sm_90 as a launch specializes it — the arguments in ``blocks``
    as tensor descriptors of [1, *those] blocks and dtype ``ty`` (fp16 / bf16), the others typed by
    ``types`` or i32, pointers and the integers in ``divisible`` known 16-divisible (as a launch
    finds them) — with num_warps 4 and the Gluon kernels' register cap; returns shared memory,
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
        elif n in blocks:  # the string a launch specializes a 3-D TensorDescriptor (tile_view's) to
            block = [1, *blocks[n]]
            layout = gl.NVMMASharedLayout.get_default_for(block, gl_ty)
            sig[n] = mangle_type(TensorDescriptor.from_tensor(torch.empty(2, 1024, 1024, dtype=torch_ty), block,
                                                              layout))
        else:
            sig[n] = types.get(n, "i32").replace("{ty}", ty)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n in divisible or sig[n].startswith("*")}
    src = GluonASTSource(kernel, sig, {(names.index(n),): v for n, v in consts.items()}, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4, "maxnreg": gluon_host.MAXNREG})
    ptx = compiled.asm["ptx"]
    regs = sorted({int(n) for n in re.findall(r"setmaxnreg[.a-z]*[.]u32\s*(\d+)", ptx)})
    serialized = " WGMMA SERIALIZED (ptxas C7514)" if wgmma_serialized(ptx) else ""
    return f"shared {compiled.metadata.shared} B, setmaxnreg {regs}, {ptxas_resources(ptx, 90)}{serialized}"


def compile_only() -> None:
    """Compile the forward for sm_90 as a launch specializes it, each head dim, ring depth and mask."""
    from flashlab.kernels.forward_gluon import attn_fwd_gluon_kernel

    block_m = gluon_host.BLOCK_M
    points = [(d, t, c) for d, ts in VARIANTS.items() for t in ts for c in (("fp16", False), ("bf16", True))]
    for head_dim, (block_n, stages), (ty, causal) in points:
        blocks = {"q_desc": [block_m // 2, head_dim], "k_desc": [block_n, head_dim], "v_desc": [block_n, head_dim]}
        # Full rows compile the tile-multiple kernel, causal rows the ragged one (EVEN_K off).
        consts = {"HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n, "STAGES": stages, "CAUSAL": causal,
                  "EVEN_K": not causal}
        report = compile_report(attn_fwd_gluon_kernel, consts, blocks, ty,
                                {"Out": "*{ty}", "LSE": "*fp32", "qk_scale": "fp32"})
        kind = "causal, ragged" if causal else "full, even"
        print(f"d{head_dim} {ty} {kind} {block_n} keys × {stages} stages: {report}", flush=True)


def check(rows: list[dict]) -> set[tuple[int, tuple[int, int]]]:
    """Every variant on odd shapes: poisoned outputs, the accuracy rule against the fp32 reference
    and the LSE against the standard forward's. Returns the (head dim, tiles) that failed."""
    import flashlab
    from flashlab.reference import accuracy_check, naive_attention, reference_attention

    failed = set()
    for batch, sq, sk, heads, kv_heads, head_dim, dtype, causal in [
            (2, 1024, 1024, 8, 8, 128, torch.bfloat16, False), (2, 1024, 1024, 8, 8, 128, torch.float16, True),
            (1, 1100, 1100, 6, 2, 128, torch.bfloat16, True), (3, 1030, 2049, 4, 1, 128, torch.float16, False),
            (1, 4096, 4096, 8, 2, 64, torch.float16, False), (1, 4100, 4100, 4, 1, 64, torch.bfloat16, True),
            (2, 1024, 1024, 4, 2, 256, torch.bfloat16, False), (1, 1100, 1100, 4, 4, 256, torch.float16, True),
            (1, 1030, 2100, 4, 2, 128, torch.float16, True)]:  # causal bottom-right with a key prefix
        torch.manual_seed(sq + sk + head_dim)
        q = torch.randn(batch, sq, heads, head_dim, device="cuda", dtype=dtype)
        k, v = (torch.randn(batch, sk, kv_heads, head_dim, device="cuda", dtype=dtype) for _ in range(2))
        ref = reference_attention(q, k, v, dtype=torch.float32, causal=causal)
        low = naive_attention(q, k, v, causal=causal)
        _, ref_lse = flashlab.ops.attention_forward(q, k, v, head_dim ** -0.5, causal, True)
        for tiles in VARIANTS[head_dim]:
            out, lse = gluon_direct(q, k, v, causal, tiles, poison=True)
            result = accuracy_check(out, ref, low)
            lse_err = (lse - ref_lse).abs().max().item()  # NaN if a row was never written
            passed = result.ok and not out.isnan().any().item() and lse_err < 1e-3
            if not passed:
                failed.add((head_dim, tiles))
            rows.append({"kind": "check", "tiles": list(tiles), "shape": [batch, sq, sk, heads, kv_heads, head_dim],
                         "dtype": str(dtype), "causal": causal, "ok": passed, "detail": str(result),
                         "lse_max_err": lse_err})
            print("check", "PASS" if passed else "FAIL", rows[-1]["shape"], dtype, "causal" if causal else "full",
                  tiles, result, f"lse err {lse_err:.2e}", flush=True)
    return failed


def time_grid(rows: list[dict], failed: set) -> None:
    """TFLOP/s of the forward on the FlashAttention grid (16k tokens, heads × head dim = 2048), fp16,
    of the variants not in ``failed`` beside the `tl` forward and SDPA's backends."""
    import torch.nn.functional as F
    from kernel_check import with_env
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import flashlab

    for head_dim, causal, seqlen in itertools.product((64, 128, 256), (False, True), (1024, 4096, 16384)):
        heads, batch = 2048 // head_dim, 16384 // seqlen
        q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.float16) for _ in range(3))
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        flops = 4 * batch * heads * seqlen * seqlen * head_dim // (2 if causal else 1)
        fns = {f"gluon{t[0]}s{t[1]}": (lambda t=t, q=q, k=k, v=v, c=causal: gluon_direct(q, k, v, c, t))
               for t in VARIANTS[head_dim] if (head_dim, t) not in failed}
        # flashlab's portable `tl` forward (the Gluon one is the default here: switched off for it).
        fns["flashlab-tl"] = with_env(lambda q=q, k=k, v=v, c=causal: flashlab.flash_attn_func(q, k, v, causal=c),
                                      "FLASHLAB_FWD_GLUON", "0")
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
        best = max((t for n, t in line.items() if n.startswith("gluon")), default=math.nan)
        print(f"d{head_dim} {'causal' if causal else 'full'} seqlen {seqlen}: "
              + "  ".join(f"{n} {t:.0f}" for n, t in line.items())
              + f"  best gluon / tl {best / line['flashlab-tl']:.2f}x, / cudnn {best / line['sdpa-cudnn']:.2f}x",
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
    failed = check(rows)
    if failed:
        print("correctness FAILED for", sorted(failed), "- those variants are not timed")
    time_grid(rows, failed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gluon_forward.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
