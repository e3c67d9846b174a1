"""Compile the attention kernels for Hopper (sm_90) and Ampere (sm_80) without a GPU.

Run as a script with TRITON_INTERPRET unset (test_kernel_compile.py does): Triton's interpreter,
which runs the CPU tests, accepts code that the real compiler rejects (types, layouts, shared
memory over the limit), so this compiles each kernel × feature set × head dim with the tile
configs kernels/configs.py ships for that architecture. Prints one line per compile; exit 1 if any
failed. With KERNEL_COMPILE_PTXAS=1 each line also gives registers and spills (ptxas -v): the
resource report that costs no GPU time.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flashlab.kernels import backward, configs, forward, forward_tma

POINTERS = {"Q": "*fp16", "K": "*fp16", "V": "*fp16", "O": "*fp16", "DO": "*fp16", "DQ": "*fp16", "DK": "*fp16",
            "DV": "*fp16", "LSE": "*fp32", "DELTA": "*fp32", "DLSE": "*fp32"}
DUMMY = "*fp16"  # ops.py passes q for an absent feature's pointer: compile with that type, as a launch does


def optional_pointer(name: str, flags: dict) -> str:
    """The type a launch gives an optional pointer under ``flags``: its own when the feature is on."""
    kind = flags["MASK_KIND"]
    present = {"CU_Q": flags["IS_VARLEN"], "CU_K": flags["IS_VARLEN"], "SLOPES": flags["HAS_ALIBI"],
               "MASK": kind > 0, "SPARSE_TABLE": kind == 3, "SPARSE_KV": kind == 3, "SPARSE_Q": kind == 3}
    if not present[name]:
        return DUMMY
    if name == "MASK":
        return {1: "*i1", 2: "*fp16", 3: "*u8"}[kind]  # bool, additive in the input dtype, block-sparse tiles
    return "*fp32" if name == "SLOPES" else "*i32"
FLOATS = {"softmax_scale", "cap_in", "cap_out", "dropout_p"}
FLAGS = dict(BOTTOM_RIGHT=True, HAS_UPPER=False, HAS_LOWER=False, IS_VARLEN=False, HAS_SOFTCAP=False,
             HAS_ALIBI=False, MASK_KIND=0, HAS_DROPOUT=False, SPARSE_M=1, SPARSE_N=1)
FEATURES = {
    "plain": {},
    "causal": dict(HAS_UPPER=True),
    "every-option": dict(HAS_UPPER=True, HAS_LOWER=True, IS_VARLEN=True, HAS_SOFTCAP=True, HAS_ALIBI=True,
                         MASK_KIND=2, HAS_DROPOUT=True),
    "bool-mask": dict(MASK_KIND=1),
    "block-sparse": dict(MASK_KIND=3, SPARSE_M=128, SPARSE_N=128),  # 128-blocks: no tile shrinking
}


def compile_kernel(kernel: triton.JITFunction, consts: dict, cfg: configs.TileConfig | None, arch: int) -> str:
    """Compile for ``sm_{arch}`` as a launch with 16-divisible pointers, strides and lengths is
    specialized; returns what it uses: shared memory (bytes) and, with KERNEL_COMPILE_PTXAS=1,
    ptxas's registers per thread and spill bytes."""
    sig: dict[str, str] = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in consts:
            sig[name] = "constexpr"
        elif name.isupper():
            sig[name] = POINTERS.get(name) or optional_pointer(name, {**FLAGS, **consts})
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    names = list(sig)
    # A launch specializes arguments that are multiples of 16 (tt.divisibility): pointers from torch's
    # allocator, and the strides and lengths of the common shapes. Without it Triton cannot prove the
    # loads aligned, does not pipeline them, and the report describes a kernel no launch runs.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
             if sig[name] != "constexpr" and (name.isupper() or name.startswith(("stride", "seqlen")))}
    src = ASTSource(kernel, sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages} if cfg else {"num_warps": 4}
    options.update(configs.FP_FUSION)  # as ops.py launches them
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    report = f"smem {compiled.metadata.shared}"
    if os.environ.get("KERNEL_COMPILE_PTXAS") == "1":
        report += " " + ptxas_resources(compiled.asm["ptx"], arch)
    return report


def ptxas_resources(ptx: str, arch: int) -> str:
    """Registers and spills of ``ptx`` by Triton's bundled ptxas (the compiler's resource report)."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    out = ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        for ptxas in (bundled / "ptxas-blackwell", bundled / "ptxas"):  # the first that reads this PTX
            if not ptxas.exists():
                continue
            out = subprocess.run([str(ptxas), "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.o")],
                                 capture_output=True, text=True).stderr
            if "Used" in out:
                break
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return (f"regs {regs.group(1) if regs else '?'} spill-st {spills.group(1) if spills else '?'} "
            f"spill-ld {spills.group(2) if spills else '?'}")


def _jobs() -> list[tuple[int, int, str, str, int]]:
    """(arch, head dim, feature set, kernel, seqlen_k given to the config choice: 0 = unknown)."""
    jobs = [(arch, head_dim, feature, kernel, 0) for arch, head_dims in ((90, (64, 128, 192, 256)), (80, (128, 192)))
            for head_dim in head_dims for feature in FEATURES for kernel in ("fwd", "dkdv", "dq")]
    # the short-sequence causal backward tiles (configs.SHORT_CAUSAL_KEYS)
    jobs += [(90, head_dim, "causal", kernel, configs.SHORT_CAUSAL_KEYS) for head_dim in (80, 128)
             for kernel in ("dkdv", "dq")]
    # the TMA forward experiment (Hopper, the plain dense case only)
    return jobs + [(90, head_dim, feature, "fwd-tma", 0) for head_dim in (64, 128, 192, 256)
                   for feature in ("plain", "causal")]


def _compile_job(job: tuple[int, int, str, str, int]) -> str:
    """One compile with the config kernels/configs.py ships for that architecture; a report line."""
    arch, head_dim, feature, kernel_name, seqlen_k = job
    configs.device_capability = lambda device: (arch // 10, arch % 10)
    device = torch.device("cuda")
    flags = FEATURES[feature]
    block_d = configs.padded_head_dim(head_dim)
    causal = flags.get("HAS_UPPER", False)
    aligned = head_dim == 256 and not flags.get("IS_VARLEN", False)
    kv_cfg, dq_cfg = configs.backward_config(block_d, causal, device, aligned, seqlen_k,
                                             flags.get("HAS_DROPOUT", False))
    fwd_cfg = configs.forward_config(block_d, causal, device, aligned)
    kernel, cfg = {"fwd": (forward.attn_fwd_kernel, fwd_cfg), "fwd-tma": (forward_tma.attn_fwd_tma_kernel, fwd_cfg),
                   "dkdv": (backward.attn_bwd_dkdv_kernel, kv_cfg), "dq": (backward.attn_bwd_dq_kernel, dq_cfg)}[
        kernel_name]
    consts = {**FLAGS, **flags, "HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_M": cfg.block_m,
              "BLOCK_N": cfg.block_n}
    params = inspect.signature(kernel.fn).parameters
    consts = {name: value for name, value in consts.items() if name in params}
    short = f" seqlen_k {seqlen_k}" if seqlen_k else ""
    where = f"sm_{arch} d{head_dim} {feature:<12} {kernel_name:<7} {cfg}{short}"
    try:
        return f"ok   {where} {compile_kernel(kernel, consts, cfg, arch)}"
    except Exception as exc:  # noqa: BLE001 - report every failure, then exit 1
        return f"FAIL {where}: {type(exc).__name__}: {str(exc)[:400]}"


def main() -> int:
    if configs.interpreting():
        print("unset TRITON_INTERPRET: this compiles for real GPUs")
        return 2
    failed = 0
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for line in pool.map(_compile_job, _jobs()):
            print(line, flush=True)
            failed += not line.startswith("ok ")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
