"""Ring attention against the references at a size that fits one GPU (issue 10's correctness run).

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 -m flashlab.distributed.check --json ring-check.json

Every rank builds the same global q, k, v and upstream gradient (one seed), runs
``ring_flash_attn_func`` on its shard, forward and backward, for each method × sharding × causal
combination; the outputs and gradients are gathered to rank 0, which checks them by the accuracy
rule of ANCHORS.md: the error against the fp32 reference (``reference_attention``) at most twice the
same-dtype naive attention's error (three times for gradients). The references materialize the
scores: seqlen² · heads · 4 bytes (8192² · 16 · 4 = 4.3 GB), so keep the sequence modest.
On CPU processes (gloo, ``--device cpu``) it checks the script itself with tiny defaults.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.distributed as dist

from flashlab.distributed import gather_sequence, ring_flash_attn_func, shard_sequence
from flashlab.distributed.bench import init_group
from flashlab.distributed.plan import METHODS
from flashlab.reference import accuracy_check, naive_attention, reference_attention


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlen", type=int, help="global sequence length (default 8192 on CUDA, 96 on CPU)")
    p.add_argument("--heads", type=int, help="query heads (default 16 on CUDA, 4 on CPU)")
    p.add_argument("--kv-heads", type=int, help="key/value heads (default 4 on CUDA, 2 on CPU: GQA)")
    p.add_argument("--head-dim", type=int, help="default 128 on CUDA, 32 on CPU")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--json", help="write the rows (and the environment) to this file (rank 0)")
    return p


def _global_inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(1234)  # the same tensors on every rank

    def t(heads: int) -> torch.Tensor:
        return torch.randn(1, args.seqlen, heads, args.head_dim, generator=gen).to(device, dtype)
    return [t(args.heads), t(args.kv_heads), t(args.kv_heads), t(args.heads)]  # q, k, v, dout


def _check(got: list[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
           causal: bool) -> dict[str, object]:
    """The accuracy rule on (out, dq, dk, dv) against the fp32 reference and the same-dtype naive one."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*leaves, causal=causal, dtype=torch.float32)
    ref_grads = torch.autograd.grad(ref, leaves, dout.float())
    low_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    low = naive_attention(*low_leaves, causal=causal)
    low_grads = torch.autograd.grad(low, low_leaves, dout)
    row: dict[str, object] = {}
    ok = True
    for name, g, r, lo, factor in zip(("out", "dq", "dk", "dv"), got, (ref, *ref_grads), (low, *low_grads),
                                      (2.0, 3.0, 3.0, 3.0)):
        c = accuracy_check(g, r, lo, factor=factor)
        row[name] = f"{c.max_error:.2e}/{c.allowed:.2e}"
        ok &= c.ok
    row["ok"] = ok
    return row


def parse_args(argv: list[str] | None = None, cuda: bool | None = None) -> argparse.Namespace:
    """The flags, with the sizes defaulted for CUDA (a real size) or CPU (tiny)."""
    args = _parser().parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if (torch.cuda.is_available() if cuda is None else cuda) else "cpu"
    for name, gpu, cpu in (("seqlen", 8192, 96), ("heads", 16, 4), ("kv_heads", 4, 2), ("head_dim", 128, 32)):
        if getattr(args, name) is None:
            setattr(args, name, gpu if args.device == "cuda" else cpu)
    return args


def check_all(args: argparse.Namespace, device: torch.device, verbose: bool = True) -> list[dict[str, object]]:
    """Every method × sharding × causal case on the initialized default group (collective); rank 0
    returns the rows (the others an empty list)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    q, k, v, dout = _global_inputs(args, device, dtype)
    rows = []
    for method, sharding, causal in itertools.product(METHODS, ("contiguous", "zigzag"), (False, True)):
        local = [shard_sequence(t, world, rank, sharding=sharding).detach().clone() for t in (q, k, v, dout)]
        ql, kl, vl = (t.requires_grad_() for t in local[:3])
        out_l = ring_flash_attn_func(ql, kl, vl, causal=causal, method=method, sharding=sharding)
        grads_l = torch.autograd.grad(out_l, (ql, kl, vl), local[3])
        got = [gather_sequence(t, sharding=sharding) for t in (out_l, *grads_l)]
        if rank == 0:
            row = {"method": method, "sharding": sharding, "causal": causal, **_check(got, q, k, v, dout, causal)}
            rows.append(row)
            if verbose:
                print(" ".join(f"{key}={val}" for key, val in row.items()), flush=True)
        dist.barrier()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = args.device == "cuda"
    device = init_group(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        rows = check_all(args, device)
        if rank == 0:
            failed = sum(not r["ok"] for r in rows)
            print(f"{len(rows) - failed}/{len(rows)} passed (world {world}, S {args.seqlen}, "
                  f"H {args.heads}:{args.kv_heads}, d {args.head_dim}, {args.dtype})")
            if args.json:
                env = {"world_size": world, "backend": dist.get_backend(), "torch": torch.__version__,
                       "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                       "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE") if cuda else None}
                with open(args.json, "w") as f:
                    json.dump({"env": env, "config": vars(args), "rows": rows}, f, indent=1)
            return 1 if failed else 0
        return 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
