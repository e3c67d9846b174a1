"""Probe for the open block-sparse dropout bug (docs/perf-notes.md round 7, experiment 1): on the
H200, dropout with a block mask of 16-blocks gives wrong outputs whenever the tables list partial
blocks; 32-blocks and up, and 16-blocks without dropout, are right; the interpreter is right.

Lifts the guard (block_mask.MIN_DROPOUT_BLOCK) to reproduce it, then prints one line a case: the
option set, the block size, pass/fail by the accuracy rule, the max error and the wrong query rows.

Usage (GPU): PYTHONPATH=src python3 benchmarks/block_sparse_dropout_probe.py
"""

from __future__ import annotations

import importlib
import itertools
import sys
from pathlib import Path

import torch

import flashlab
from flashlab.reference import accuracy_check, naive_attention, reference_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from attn_checks import make_qkv  # noqa: E402

PREDICATES = {
    "band-mod3": lambda b, h, q, kv: (q + 20 >= kv) & (kv % 3 != 1),
    "all": lambda b, h, q, kv: (q >= 0) & (kv >= 0),
}


def run(sq: int, sk: int, head_dim: int, block: int, dropout: bool, alibi: bool, softcap: bool, name: str,
        device: str) -> None:
    torch.manual_seed(14)
    q, k, v = make_qkv(1, sq, sk, 4, 2, head_dim, torch.float16, device)
    predicate = PREDICATES[name]
    mask = flashlab.block_mask(predicate, None, None, sq, sk, device=device, block_size=block)
    kw: dict = {}
    if softcap:
        kw["softcap"] = 6.0
    if alibi:
        kw["alibi_slopes"] = torch.rand(4, device=device) * 0.3
    torch.manual_seed(5)
    ref_kw: dict = {}
    if dropout:
        out, _, keep = flashlab.flash_attn_func(q, k, v, block_mask=mask, dropout_p=0.2, return_attn_probs=True, **kw)
        ref_kw = dict(dropout_keep=keep, dropout_p=0.2)
    else:
        out = flashlab.flash_attn_func(q, k, v, block_mask=mask, **kw)
    attn_mask = mask.to_dense()  # what the tables describe, broadcast over batch and heads
    ref = reference_attention(q, k, v, dtype=torch.float64, attn_mask=attn_mask, **kw, **ref_kw)
    low = naive_attention(q, k, v, attn_mask=attn_mask, **kw, **ref_kw)
    err = (out.double() - ref).abs()
    bad = (err.amax(dim=(0, 2, 3)) > 1e-2).nonzero().flatten().tolist()
    verdict = "ok  " if accuracy_check(out, ref, low).ok else "FAIL"
    print(f"{verdict} {sq}x{sk} d{head_dim} block {block:>3} dropout={dropout:d} alibi={alibi:d} softcap={softcap:d} "
          f"{name:<9} max err {err.max().item():.3g} wrong rows {bad[:8]}{' …' if len(bad) > 8 else ''}", flush=True)


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU: TRITON_INTERPRET=1
    # The module, not flashlab.block_mask (the function that package attribute names).
    importlib.import_module("flashlab.block_mask").MIN_DROPOUT_BLOCK = 1  # reproduce the refused case
    for dropout, alibi, softcap in itertools.product([False, True], repeat=3):
        run(50, 70, 24, 16, dropout, alibi, softcap, "band-mod3", device)
    for block, name in itertools.product((16, 32, 64), ("band-mod3", "all")):
        run(50, 70, 24, block, True, False, False, name, device)
    for sq, d in ((64, 32), (128, 64), (80, 64)):  # without partial blocks, then with (80: a ragged last block)
        run(sq, sq, d, 16, True, False, False, "all", device)


if __name__ == "__main__":
    main()
