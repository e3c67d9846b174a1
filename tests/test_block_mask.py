"""Block-sparse masks (flashlab.block_mask): the compiled tables, the kernels against the dense-mask
reference (outputs and gradients, ANCHORS.md rule), skipped blocks never read, argument errors."""

from __future__ import annotations

import pytest
import torch
from attn_checks import check_against_reference, make_qkv

import flashlab
from flashlab.reference import accuracy_check, naive_attention, reference_attention

F16 = torch.float16


def _docs(lengths: list[int], device: str = "cpu") -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))


def _dense(predicate, batch: int, heads: int, sq: int, sk: int, device: str = "cpu") -> torch.Tensor:
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    q = torch.arange(sq, device=device).view(1, 1, -1, 1)
    kv = torch.arange(sk, device=device).view(1, 1, 1, -1)
    return predicate(b, h, q, kv).expand(batch, heads, sq, sk)


def test_tables_describe_the_predicate_and_are_compact():
    doc = _docs([700, 1300, 97, 1999])
    causal_doc = lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv)  # noqa: E731
    bm = flashlab.block_mask(causal_doc, None, None, 4096, 4096, block_size=128)
    assert torch.equal(bm.to_dense()[0, 0], _dense(causal_doc, 1, 1, 4096, 4096)[0, 0])
    c = bm.counts()
    assert c["full"] + c["partial"] + c["skipped"] == 32 * 32
    assert c["skipped"] > 0.75 * 32 * 32  # documents and causality skip most blocks
    # Partial tiles are deduplicated: every diagonal block of a document interior is the same tile.
    assert c["tiles"] < c["partial"]
    # Full blocks come first in each row, partial after; the transposed table lists the same blocks.
    kv, qt = bm.kv_table[0, 0], bm.q_table[0, 0]
    assert int(kv[:, 0].sum()) == int(qt[:, 0].sum()) and int(kv[:, 1].sum()) == int(qt[:, 1].sum())
    row = kv[20]
    listed = row[2::2][: int(row[0] + row[1])].tolist()
    assert all(n <= 20 for n in listed)


def test_per_head_and_batch_masks_and_padding():
    pred = lambda b, h, q, kv: (kv + b * 7 + h * 3) % 5 != 0  # noqa: E731
    bm = flashlab.block_mask(pred, 2, 3, 45, 70, block_size=(16, 32))
    assert bm.kv_table.shape[:3] == (2, 3, 3) and bm.q_table.shape[:3] == (2, 3, 3)
    assert torch.equal(bm.to_dense(), _dense(pred, 2, 3, 45, 70))


# (batch, sq, sk, heads, kv_heads, head_dim, block_size, mask name)
CASES = [
    (1, 113, 203, 6, 2, 40, 32, "document-causal"),
    (2, 113, 203, 6, 2, 72, (32, 64), "per-head-stripes"),
    (1, 97, 97, 4, 4, 40, 64, "prefix-lm"),
]


def _predicate(name: str, sq: int, sk: int, device: str):
    if name == "document-causal":
        doc_q, doc_k = _docs([30, 0, 50, 33], device), _docs([70, 0, 100, 33], device)
        off = sk - sq
        return lambda b, h, q, kv: (doc_q[q] == doc_k[kv]) & (q + off >= kv)
    if name == "per-head-stripes":
        # Varies with batch and head; query rows 5 and 80-95 of head 1 see nothing.
        return lambda b, h, q, kv: ((kv // 24 + h + b) % 3 != 0) & ~((h == 1) & ((q == 5) | ((q >= 80) & (q < 96))))
    prefix = 40
    return lambda b, h, q, kv: (kv < prefix) | (q >= kv)


@pytest.mark.parametrize("batch, sq, sk, heads, kv_heads, head_dim, block, name", CASES,
                         ids=[f"B{c[0]}-S{c[1]}x{c[2]}-H{c[3]}:{c[4]}-D{c[5]}-{c[7]}" for c in CASES])
def test_matches_dense_reference(batch, sq, sk, heads, kv_heads, head_dim, block, name, device):
    torch.manual_seed(sq + head_dim)
    pred = _predicate(name, sq, sk, device)
    per = name == "per-head-stripes"
    bm = flashlab.block_mask(pred, batch if per else None, heads if per else None, sq, sk, device=device,
                             block_size=block)
    dense = _dense(pred, batch, heads, sq, sk, device)
    q, k, v = make_qkv(batch, sq, sk, heads, kv_heads, head_dim, F16, device)
    out = flashlab.flash_attn_func(q, k, v, block_mask=bm)
    check_against_reference(out, q, k, v, attn_mask=dense)
    empty = ~dense.any(-1)  # (batch, heads, sq): rows that see nothing give zeros
    if empty.any():
        assert torch.all(out.transpose(1, 2)[empty] == 0)


def test_sdpa_layout_with_softcap_free_defaults(device):
    torch.manual_seed(11)
    q, k, v = make_qkv(2, 60, 60, 2, 1, 32, F16, device, layout="bhsd")
    pred = lambda b, h, q_, kv: (q_ // 20) == (kv // 20)  # noqa: E731 - block-diagonal
    bm = flashlab.block_mask(pred, None, None, 60, 60, device=device, block_size=16)
    out = flashlab.scaled_dot_product_attention(q, k, v, block_mask=bm, enable_gqa=True)
    check_against_reference(out, q, k, v, layout="bhsd", attn_mask=_dense(pred, 1, 1, 60, 60, device), grads=False)


def test_all_visible_mask_equals_the_plain_kernel(device):
    """Full blocks run the mask-free path: the same arithmetic as no mask at all. (128-blocks: no
    shipped tile config is larger, so the kernel keeps the plain kernel's tiles and key order.)"""
    torch.manual_seed(12)
    q, k, v = make_qkv(1, 128, 256, 2, 2, 32, F16, device)
    bm = flashlab.block_mask(lambda b, h, q_, kv: kv >= 0, None, None, 128, 256, device=device, block_size=128)
    assert bm.counts() == {"full": 2, "partial": 0, "skipped": 0, "tiles": 1}
    with torch.no_grad():
        assert torch.equal(flashlab.flash_attn_func(q, k, v, block_mask=bm), flashlab.flash_attn_func(q, k, v))


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
def test_skipped_blocks_are_not_read(device):
    """Poison every key outside the visited blocks with NaN: forward and gradients stay finite."""
    torch.manual_seed(13)
    sq = sk = 128
    doc = _docs([64, 64], device)
    pred = lambda b, h, q_, kv: doc[q_] == doc[kv]  # noqa: E731 - two 64-token documents
    bm = flashlab.block_mask(pred, None, None, sq, sk, device=device, block_size=32)
    q, k, v = make_qkv(1, sq, sk, 2, 1, 16, F16, device)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :64] = float("nan")  # keys of document 0: outside every block that rows 64.. visit
    v2[:, :64] = float("nan")
    q2, k2, v2 = (t.requires_grad_() for t in (q.detach().clone(), k2, v2))
    out = flashlab.flash_attn_func(q2, k2, v2, block_mask=bm)
    assert out[:, 64:].isfinite().all()
    ref = reference_attention(q, k, v, attn_mask=_dense(pred, 1, 1, sq, sk, device))
    assert (out[:, 64:].float() - ref[:, 64:]).abs().max() < 5e-3
    dq, dk, dv = torch.autograd.grad(out[:, 64:].float().sum(), (q2, k2, v2))
    assert dq[:, 64:].isfinite().all() and dk[:, 64:].isfinite().all() and dv[:, 64:].isfinite().all()


@pytest.mark.parametrize("block", [16, 32])
def test_dropout_alibi_softcap_combine(block, device):
    """Partial blocks with dropout, ALiBi and softcap, forward and backward. 16-blocks draw their
    dropout bits one Philox call per element (scores.dropout_keep): the joined form was wrong there
    on the H200 (perf-notes round 8)."""
    torch.manual_seed(14)
    q, k, v = make_qkv(1, 50, 70, 4, 2, 24, F16, device)
    pred = lambda b, h, q_, kv: (q_ + 20 >= kv) & (kv % 3 != 1)  # noqa: E731
    bm = flashlab.block_mask(pred, None, None, 50, 70, device=device, block_size=block)
    slopes = torch.rand(4, device=device) * 0.3
    kw = dict(softcap=6.0, alibi_slopes=slopes)
    torch.manual_seed(5)
    out, _, keep = flashlab.flash_attn_func(q, k, v, block_mask=bm, dropout_p=0.2, return_attn_probs=True, **kw)
    check_against_reference(out, q, k, v, attn_mask=_dense(pred, 1, 1, 50, 70, device), dropout_keep=keep,
                            dropout_p=0.2, **kw)


def test_errors(device):
    q, k, v = make_qkv(1, 40, 40, 2, 2, 16, F16, device)
    ok = lambda b, h, q_, kv: q_ >= kv  # noqa: E731
    bm = flashlab.block_mask(ok, None, None, 40, 40, device=device, block_size=16)
    with pytest.raises(TypeError, match="block_mask"):
        flashlab.flash_attn_func(q, k, v, block_mask=torch.ones(40, 40, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_mask cannot be combined with causal"):
        flashlab.flash_attn_func(q, k, v, causal=True, block_mask=bm)
    with pytest.raises(ValueError, match="window_size"):
        flashlab.flash_attn_func(q, k, v, window_size=(4, 0), block_mask=bm)
    with pytest.raises(ValueError, match="seqlen_q, seqlen_k = 40, 40"):
        flashlab.flash_attn_func(q[:, :30], k, v, block_mask=bm)
    per_head = flashlab.block_mask(ok, None, 3, 40, 40, device=device, block_size=16)
    with pytest.raises(ValueError, match="heads = 3"):
        flashlab.flash_attn_func(q, k, v, block_mask=per_head)
    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
    with pytest.raises(ValueError, match="attn_mask"):
        flashlab.scaled_dot_product_attention(qs, ks, vs, attn_mask=torch.ones(40, 40, dtype=torch.bool,
                                                                                device=device), block_mask=bm)
    with pytest.raises(TypeError, match="predicate must return a bool tensor"):
        flashlab.block_mask(lambda b, h, q_, kv: q_ - kv, None, None, 8, 8)
    with pytest.raises(TypeError, match="predicate must be callable"):
        flashlab.block_mask("causal", None, None, 8, 8)
    with pytest.raises(ValueError, match="block_size"):
        flashlab.block_mask(ok, None, None, 8, 8, block_size=48)
    with pytest.raises(ValueError, match="seqlen_k"):
        flashlab.block_mask(ok, None, None, 8, 0)
    with pytest.raises(ValueError, match="batch"):
        flashlab.block_mask(ok, -2, None, 8, 8)
    with pytest.raises(ValueError, match="does not broadcast"):
        flashlab.block_mask(lambda b, h, q_, kv: torch.ones(3, 5, dtype=torch.bool), None, None, 8, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_document_mask_16k(dtype):
    """16k tokens of causal documents, GQA 16:4, head dim 128: tables stay small, and each document's
    output and gradients match the per-document reference (the dense 16k mask is never built)."""
    torch.manual_seed(0)
    lengths = [1000, 3000, 77, 4096, 2500, 1, 5710]
    sq = sum(lengths)
    doc = _docs(lengths, "cuda")
    bm = flashlab.block_mask(lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv), None, None, sq, sq,
                             device="cuda")
    assert bm.sparsity() > 0.7 and bm.tiles.numel() < 64 * 128 * 128
    q = torch.randn(1, sq, 16, 128, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(1, sq, 4, 128, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(1, sq, 4, 128, device="cuda", dtype=dtype, requires_grad=True)
    out = flashlab.flash_attn_func(q, k, v, block_mask=bm)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        qs, ks, vs = (t[:, sl].detach().requires_grad_() for t in (q, k, v))
        ref = reference_attention(qs, ks, vs, causal=True)
        low = naive_attention(qs, ks, vs, causal=True)
        assert accuracy_check(out[:, sl], ref, low).ok
        want = torch.autograd.grad(ref, (qs, ks, vs), g[:, sl].float())
        same = torch.autograd.grad(low, (qs, ks, vs), g[:, sl])
        for got, w, s in zip(grads, want, same):
            assert accuracy_check(got[:, sl], w, s, factor=3.0).ok
        start += n


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [40, 72, 128, 256])
def test_gpu_odd_shapes_per_head_masks(head_dim):
    """bf16, ragged 1000×1537, GQA 6:2, a mask that varies per batch and head, default 128 blocks."""
    torch.manual_seed(head_dim)
    pred = _predicate("per-head-stripes", 1000, 1537, "cuda")
    bm = flashlab.block_mask(pred, 2, 6, 1000, 1537, device="cuda")
    q, k, v = make_qkv(2, 1000, 1537, 6, 2, head_dim, torch.bfloat16, "cuda")
    out = flashlab.flash_attn_func(q, k, v, block_mask=bm)
    check_against_reference(out, q, k, v, attn_mask=_dense(pred, 2, 6, 1000, 1537, "cuda"))


@pytest.mark.gpu
def test_gpu_skipping_shows_in_time():
    """A 64-document causal mask at 16k visits ~1/64 of the causal blocks: it must run far faster than
    plain causal; and a fixed sliding window grows linearly with seqlen (4× tokens → < 6× time)."""
    from triton.testing import do_bench

    def timed(sq: int, **kw) -> float:
        q, k, v = (torch.randn(1, sq, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        return do_bench(lambda: flashlab.flash_attn_func(q, k, v, **kw), warmup=25, rep=100)

    doc = _docs([256] * 64, "cuda")
    bm = flashlab.block_mask(lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv), None, None, 16384, 16384,
                             device="cuda")
    assert timed(16384, block_mask=bm) < 0.2 * timed(16384, causal=True)
    window = dict(causal=True, window_size=(512, 0))
    assert timed(16384, **window) < 6 * timed(4096, **window)
