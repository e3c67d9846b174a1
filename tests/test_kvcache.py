"""flash_attn_with_kvcache: decoding against a (paged) KV cache with in-place append and split-KV.

The first part runs the kernels in Triton's interpreter on tiny odd shapes (or on the GPU if there
is one); the ``gpu`` part at real sizes. The reference is ``reference_attention`` on the cache
gathered per sequence (each sequence has its own length)."""

from __future__ import annotations

import math

import pytest
import torch
from attn_checks import check_against_reference

from flashlab import flash_attn_with_kvcache
from flashlab.reference import reference_attention


def make_case(batch, seqlen_q, heads, kv_heads, head_dim, lens, seqlen_new, capacity, dtype, device):
    """q, a contiguous cache (random everywhere, also past the lengths), new k/v and int32 lengths."""
    g = lambda *shape: torch.randn(*shape, dtype=dtype, device=device)  # noqa: E731
    q = g(batch, seqlen_q, heads, head_dim)
    k_cache, v_cache = g(batch, capacity, kv_heads, head_dim), g(batch, capacity, kv_heads, head_dim)
    k_new = g(batch, seqlen_new, kv_heads, head_dim) if seqlen_new else None
    v_new = g(batch, seqlen_new, kv_heads, head_dim) if seqlen_new else None
    return q, k_cache, v_cache, k_new, v_new, torch.tensor(lens, dtype=torch.int32, device=device)


def to_paged(k_cache, page_size, seed=0):
    """The same cache as pages in shuffled order, with spare pages; unused table entries are -1."""
    rows, capacity = k_cache.shape[:2]
    per_row = math.ceil(capacity / page_size)
    num_pages = rows * per_row + 3
    perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed))[: rows * per_row]
    table = perm.view(rows, per_row).to(torch.int32)
    paged = torch.randn(num_pages, page_size, *k_cache.shape[2:], dtype=k_cache.dtype, device=k_cache.device)
    for b in range(rows):
        for j in range(capacity):
            paged[table[b, j // page_size], j % page_size] = k_cache[b, j]
    return paged, torch.cat([table, torch.full((rows, 2), -1, dtype=torch.int32)], 1).to(k_cache.device)


def gather(cache, b, n, block_table=None):
    """Keys 0..n-1 of sequence b as (1, n, kv_heads, head_dim)."""
    if block_table is None:
        return cache[b, :n][None]
    pos = torch.arange(n, device=cache.device)
    return cache[block_table[b, pos // cache.shape[1]].long(), pos % cache.shape[1]][None]


def expected_cache(k_cache, k_new, lens, rows=None):
    want = k_cache.clone()
    for b, n in enumerate(lens.tolist()):
        want[rows[b] if rows is not None else b, n:n + k_new.shape[1]] = k_new[b]
    return want


def check_rows(out, q, k_cache, v_cache, totals, causal, lse=None, block_table=None, rows=None):
    for b, n in enumerate(totals):
        r = rows[b] if rows is not None else b
        kb, vb = gather(k_cache, r, n, block_table), gather(v_cache, r, n, block_table)
        check_against_reference(out[b:b + 1], q[b:b + 1], kb, vb, grads=False, causal=causal)
        if lse is not None:
            _, ref_lse = reference_attention(q[b:b + 1], kb, vb, dtype=torch.float64, causal=causal, return_lse=True)
            assert torch.equal(lse[b:b + 1].isinf(), ref_lse.isinf())
            fin = ref_lse.isfinite()
            if fin.any():
                assert (lse[b:b + 1][fin].double() - ref_lse[fin]).abs().max() < 1e-3


CASES = [  # batch, seqlen_q, heads, kv_heads, head_dim, cache lengths, seqlen_new, capacity, causal
    (3, 1, 4, 1, 32, [0, 1, 17], 0, 40, False),
    (3, 1, 6, 2, 40, [0, 1, 17], 1, 41, True),
    (2, 5, 4, 2, 64, [0, 33], 5, 45, True),
    (1, 7, 2, 2, 16, [2], 0, 9, True),  # 5 of 7 query rows see no key (bottom-right alignment)
    (1, 20, 8, 2, 16, [45], 3, 50, True),  # 80 rows per kv head: several row blocks
    (2, 3, 3, 3, 8, [19, 50], 3, 53, False),
]


def case_id(c):
    b, sq, h, hk, d, lens, new, cap, causal = c
    return f"B{b}-Sq{sq}-H{h}:{hk}-D{d}-L{'.'.join(map(str, lens))}+{new}of{cap}-{'causal' if causal else 'full'}"


@pytest.mark.parametrize("num_splits", [1, 3, 0], ids=["splits1", "splits3", "auto"])
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_matches_reference_and_appends_in_place(case, num_splits, device):
    b, sq, h, hk, d, lens, new, cap, causal = case
    torch.manual_seed(sum(lens) + sq)
    q, k_cache, v_cache, k, v, seqlens = make_case(b, sq, h, hk, d, lens, new, cap, torch.float16, device)
    want_k = expected_cache(k_cache, k, seqlens) if new else k_cache.clone()
    want_v = expected_cache(v_cache, v, seqlens) if new else v_cache.clone()
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=causal,
                                       num_splits=num_splits, return_softmax_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (b, h, sq)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)  # appended, nothing else touched
    check_rows(out, q, k_cache, v_cache, [n + new for n in lens], causal, lse=lse)


@pytest.mark.parametrize("page_size", [16, 32, 48, 5])
def test_paged_equals_contiguous(page_size, device):
    torch.manual_seed(page_size)
    lens, new, cap = [0, 17, 70], 2, 75
    q, k_cache, v_cache, k, v, seqlens = make_case(3, 2, 4, 2, 32, lens, new, cap, torch.float16, device)
    k_pages, table = to_paged(k_cache, page_size, seed=1)
    v_pages, _ = to_paged(v_cache, page_size, seed=1)
    want = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=True, num_splits=2)
    got = flash_attn_with_kvcache(q, k_pages, v_pages, k, v, cache_seqlens=seqlens, block_table=table,
                                  causal=True, num_splits=2)
    assert torch.equal(got, want)
    for b, n in enumerate(lens):  # the new tokens landed in the right pages
        assert torch.equal(gather(k_pages, b, n + new, table), k_cache[b:b + 1, :n + new])
        assert torch.equal(gather(v_pages, b, n + new, table), v_cache[b:b + 1, :n + new])
    check_rows(got, q, k_pages, v_pages, [n + new for n in lens], True, block_table=table)


def test_cache_batch_idx_int_seqlens_and_strided_views(device):
    """Batch rows map to cache rows 3 and 1; one int length; q and the cache are strided views
    (the cache a (rows, kv_heads, capacity, dim) tensor seen as (rows, capacity, kv_heads, dim))."""
    torch.manual_seed(5)
    q = torch.randn(2, 8, 3, 32, dtype=torch.float16, device=device)[:, :, ::2]  # heads 4, strided
    q = q.transpose(1, 2)  # (2, 3, 4, 32): (batch, seqlen_q, heads, dim) view with odd strides
    cache = torch.randn(2, 4, 2, 30, 32, dtype=torch.float16, device=device)
    k_cache, v_cache = (c.transpose(1, 2) for c in cache)
    k, v = (torch.randn(2, 3, 2, 32, dtype=torch.float16, device=device) for _ in range(2))
    idx = torch.tensor([3, 1], dtype=torch.int32, device=device)
    want_k = expected_cache(k_cache, k, torch.tensor([21, 21]), rows=[3, 1])
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=21, cache_batch_idx=idx, causal=True)
    assert torch.equal(k_cache, want_k)
    check_rows(out, q, k_cache, v_cache, [24, 24], True, rows=[3, 1])


def test_no_cache_seqlens_means_full_cache_and_split_agreement(device):
    torch.manual_seed(7)
    q, k_cache, v_cache, *_ = make_case(2, 1, 8, 2, 16, [0, 0], 0, 99, torch.float16, device)
    outs = [flash_attn_with_kvcache(q, k_cache, v_cache, num_splits=s) for s in (1, 2, 5, 0)]
    check_rows(outs[0], q, k_cache, v_cache, [99, 99], False)
    for o in outs[1:]:
        assert (o.float() - outs[0].float()).abs().max() < 2e-3


def test_torch_path_without_interpreter(monkeypatch):
    """CPU tensors outside the interpreter: the same semantics through PyTorch ops (fp32 too)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(9)
    q, k_cache, v_cache, k, v, seqlens = make_case(3, 2, 4, 2, 24, [0, 5, 30], 2, 40, torch.float32, "cpu")
    k_pages, table = to_paged(k_cache, 16)
    v_pages, _ = to_paged(v_cache, 16)
    want_k = expected_cache(k_cache, k, seqlens)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=True,
                                       return_softmax_lse=True)
    assert torch.equal(k_cache, want_k)
    check_rows(out, q, k_cache, v_cache, [2, 7, 32], True, lse=lse)
    paged = flash_attn_with_kvcache(q, k_pages, v_pages, k, v, cache_seqlens=seqlens, block_table=table, causal=True)
    assert (paged - out).abs().max() < 1e-5


def test_registered_ops_match_the_public_function(device):
    """flashlab::kvcache_append / flashlab::kvcache_attn (what torch.compile sees) give the same result."""
    torch.manual_seed(3)
    q, k_cache, v_cache, k, v, seqlens = make_case(2, 2, 4, 2, 16, [3, 30], 2, 40, torch.float16, device)
    caches = k_cache.clone(), v_cache.clone()
    want = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=True, num_splits=3)
    torch.ops.flashlab.kvcache_append(k, v, *caches, seqlens, None, None)
    assert torch.equal(caches[0], k_cache) and torch.equal(caches[1], v_cache)
    out, lse = torch.ops.flashlab.kvcache_attn(q, *caches, seqlens, None, None, 2, 0.25, True, 3, 1)
    assert torch.equal(out, want) and lse.shape == (2, 4, 2)


def test_empty_batch_and_no_queries(device):
    kc = torch.randn(0, 20, 2, 16, dtype=torch.float16, device=device)
    out = flash_attn_with_kvcache(torch.randn(0, 1, 4, 16, dtype=torch.float16, device=device), kc, kc,
                                  cache_seqlens=torch.zeros(0, dtype=torch.int32, device=device))
    assert out.shape == (0, 1, 4, 16)
    q, k_cache, v_cache, k, v, seqlens = make_case(2, 0, 4, 2, 16, [3, 7], 2, 20, torch.float16, device)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, return_softmax_lse=True)
    assert out.shape == (2, 0, 4, 16) and lse.shape == (2, 4, 0)
    assert torch.equal(k_cache[1, 7:9], k[1])  # the new tokens are appended even without queries


# batch, seqlen_q, heads, kv_heads, cache lengths, seqlen_new, capacity, causal, window, softcap, alibi
FEATURE_CASES = [
    (3, 1, 6, 2, [0, 17, 40], 1, 48, True, (9, -1), 0.0, None),  # sliding window, one new token
    (2, 5, 4, 2, [3, 33], 5, 45, True, (6, 0), 0.0, None),  # window narrower than the new tokens
    (2, 4, 4, 4, [20, 7], 0, 30, False, (5, 2), 0.0, None),  # two-sided window, not causal
    (2, 3, 4, 1, [19, 50], 2, 53, True, (-1, -1), 4.0, None),  # softcap
    (2, 2, 6, 3, [11, 40], 1, 41, False, (-1, -1), 0.0, "heads"),  # ALiBi (heads,)
    (3, 1, 4, 2, [0, 5, 37], 1, 40, True, (12, -1), 3.0, "batch"),  # all three, ALiBi (batch, heads)
    (2, 2, 4, 2, [70, 100], 1, 104, True, (10, -1), 0.0, None),  # splits cut only the window's keys
]


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged16"])
@pytest.mark.parametrize("num_splits", [1, 3], ids=["splits1", "splits3"])
@pytest.mark.parametrize("case", FEATURE_CASES, ids=[f"case{i}" for i in range(len(FEATURE_CASES))])
def test_window_softcap_alibi_match_reference(case, num_splits, paged, device):
    """flash-attn's window_size / softcap / alibi_slopes, aligned like causal over the cache length."""
    _check_feature_case(case, num_splits, paged, device)


@pytest.mark.parametrize("case", FEATURE_CASES[-3:-1], ids=["alibi-heads", "all-three"])
def test_window_softcap_alibi_on_the_torch_path(case, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors then take the PyTorch path
    _check_feature_case(case, 0, True, "cpu")


def _check_feature_case(case, num_splits, paged, device):
    b, sq, h, hk, lens, new, cap, causal, window, softcap, alibi = case
    torch.manual_seed(len(lens) + sq + h)
    q, k_cache, v_cache, k, v, seqlens = make_case(b, sq, h, hk, 16, lens, new, cap, torch.float16, device)
    slopes = None
    if alibi:
        slopes = torch.rand(h if alibi == "heads" else (b, h), dtype=torch.float32, device=device) * 0.5
    table = None
    if paged:
        k_cache, table = to_paged(k_cache, 16)
        v_cache, _ = to_paged(v_cache, 16)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, block_table=table,
                                       causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes,
                                       num_splits=num_splits, return_softmax_lse=True)
    for i, n in enumerate(n + new for n in lens):
        kb, vb = gather(k_cache, i, n, table), gather(v_cache, i, n, table)
        row_slopes = slopes[i:i + 1] if slopes is not None and slopes.dim() == 2 else slopes
        opts = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=row_slopes)
        check_against_reference(out[i:i + 1], q[i:i + 1], kb, vb, grads=False, **opts)
        _, ref_lse = reference_attention(q[i:i + 1], kb, vb, dtype=torch.float64, return_lse=True, **opts)
        assert torch.equal(lse[i:i + 1].isinf(), ref_lse.isinf())


def _args(**over):
    q = torch.randn(2, 1, 4, 16, dtype=torch.float16)
    kc, vc = torch.randn(2, 20, 2, 16, dtype=torch.float16), torch.randn(2, 20, 2, 16, dtype=torch.float16)
    args = {"q": q, "k_cache": kc, "v_cache": vc, "cache_seqlens": torch.tensor([3, 19], dtype=torch.int32)}
    args.update(over)
    return args


def _new(n=2, dtype=torch.float16):
    return {"k": torch.randn(2, n, 2, 16, dtype=dtype), "v": torch.randn(2, n, 2, 16, dtype=dtype)}


PAGES = torch.randn(6, 16, 2, 16, dtype=torch.float16)
ERRORS = [
    ("cache-too-small", _args(**_new(2)), ValueError, r"cache too small: sequence 1 holds 19 tokens \+ 2 new"),
    ("cache-too-small-int", _args(cache_seqlens=19, **_new(2)), ValueError, "sequence 0 holds 19 tokens"),
    ("new-exceeds-capacity", _args(**_new(21)), ValueError, "21 new tokens > capacity 20"),
    ("negative-seqlens", _args(cache_seqlens=torch.tensor([-1, 0], dtype=torch.int32)), ValueError, ">= 0"),
    ("block-table-range", _args(k_cache=PAGES, v_cache=PAGES, block_table=torch.tensor([[0, 6], [1, 2]],
                                dtype=torch.int32), cache_seqlens=torch.tensor([20, 3], dtype=torch.int32)),
     ValueError, r"block_table\[0, 1\] = 6 is out of range: k_cache has 6 blocks"),
    ("block-table-dtype", _args(k_cache=PAGES, v_cache=PAGES, block_table=torch.zeros(2, 2)), TypeError,
     "block_table must be an int32 tensor"),
    ("block-table-with-batch-idx", _args(k_cache=PAGES, v_cache=PAGES, block_table=torch.zeros(2, 2, dtype=torch.int32),
                                         cache_batch_idx=torch.zeros(2, dtype=torch.int32)), ValueError,
     "cache_batch_idx cannot be combined with block_table"),
    ("batch-idx-range", _args(cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32)), ValueError,
     r"cache_batch_idx entries must be in \[0, 2\)"),
    ("cache-dtype", _args(k_cache=torch.randn(2, 20, 2, 16)), TypeError, "k_cache has dtype torch.float32"),
    ("new-dtype", _args(**_new(1, torch.bfloat16)), TypeError, "k has dtype torch.bfloat16"),
    ("k-without-v", _args(k=torch.randn(2, 1, 2, 16, dtype=torch.float16)), ValueError, "k and v must be given"),
    ("k-shape", _args(k=torch.randn(2, 1, 4, 16, dtype=torch.float16), v=torch.randn(2, 1, 4, 16,
                      dtype=torch.float16)), ValueError, "k and v must be"),
    ("seqlens-float", _args(cache_seqlens=torch.zeros(2)), TypeError, "cache_seqlens must be an int32 tensor"),
    ("seqlens-shape", _args(cache_seqlens=torch.zeros(3, dtype=torch.int32)), ValueError,
     r"cache_seqlens must have shape \(2\)"),
    ("seqlens-type", _args(cache_seqlens=3.0), TypeError, "cache_seqlens must be an int"),
    ("no-seqlens-with-k", _args(cache_seqlens=None, **_new(1)), ValueError, "without cache_seqlens"),
    ("heads", _args(q=torch.randn(2, 1, 3, 16, dtype=torch.float16)), ValueError, "multiple of the kv heads"),
    ("head-dim", _args(q=torch.randn(2, 1, 4, 32, dtype=torch.float16)), ValueError, "head_dim of q"),
    ("batch", _args(q=torch.randn(3, 1, 4, 16, dtype=torch.float16)), ValueError, "pass cache_batch_idx"),
    ("kv-cache-shape", _args(v_cache=torch.randn(2, 21, 2, 16, dtype=torch.float16)), ValueError, "same shape"),
    ("rank", _args(q=torch.randn(2, 4, 16, dtype=torch.float16)), ValueError, "q must have 4 dimensions"),
    ("not-tensor", _args(k_cache=[1.0]), TypeError, "k_cache must be a torch.Tensor"),
    ("num-splits", _args(num_splits=-1), ValueError, "num_splits must be an int >= 0"),
    ("window", _args(window_size=(-2, 0)), ValueError, "window_size left must be an int ≥ -1"),
    ("softcap", _args(softcap=-1.0), ValueError, "softcap must be a finite float ≥ 0"),
    ("alibi-shape", _args(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must have shape \(4,\) or \(2, 4\)"),
    ("alibi-dtype", _args(alibi_slopes=torch.ones(4, dtype=torch.float16)), TypeError, "alibi_slopes must be float32"),
]


@pytest.mark.parametrize("kwargs, exc, match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        flash_attn_with_kvcache(**kwargs)


def test_kernel_path_rejects_fp32(device):
    """The kernels take fp16/bf16 (CPU tensors without the interpreter take the torch path, which
    accepts fp32 too)."""
    q, cache = torch.randn(2, 1, 4, 16, device=device), torch.randn(2, 20, 2, 16, device=device)
    with pytest.raises(TypeError, match="accepted: torch.float16, torch.bfloat16$"):
        flash_attn_with_kvcache(q, cache, cache.clone())


# ---------------------------------------------------------------- GPU tier: real sizes, bf16 and fp16

GPU_CASES = [  # batch, seqlen_q, heads, kv_heads, head_dim, max cache length, page size (None: contiguous)
    (1, 1, 32, 8, 128, 32768, None),
    (4, 1, 32, 8, 128, 8191, 16),
    (3, 1, 32, 8, 128, 20000, 256),
    (2, 4, 32, 8, 128, 4099, 48),
    (2, 128, 32, 8, 128, 3000, None),  # speculative decoding: 128 new tokens
    (1, 300, 32, 8, 128, 5000, 32),
    (8, 1, 16, 1, 64, 5000, 64),  # MQA
    (2, 3, 8, 2, 256, 2500, None),
    (2, 1, 12, 4, 80, 1777, 32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=[f"B{c[0]}-Sq{c[1]}-H{c[2]}:{c[3]}-D{c[4]}-L{c[5]}-P{c[6]}"
                                                  for c in GPU_CASES])
def test_gpu_real_sizes(case, dtype):
    batch, sq, h, hk, d, max_len, page = case
    torch.manual_seed(max_len)
    lens = torch.randint(0, max_len - sq, (batch,)).tolist()
    lens[0] = max_len - sq  # one sequence fills its cache
    q, k_cache, v_cache, k, v, seqlens = make_case(batch, sq, h, hk, d, lens, sq, max_len, dtype, "cuda")
    table = None
    if page is not None:
        k_cache, table = to_paged_fast(k_cache, page)
        v_cache, _ = to_paged_fast(v_cache, page, table)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, block_table=table,
                                       causal=True, return_softmax_lse=True)
    check_rows(out, q, k_cache, v_cache, [n + sq for n in lens], True, lse=lse, block_table=table)
    one = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens + sq, block_table=table, causal=True,
                                  num_splits=1)
    assert (one.float() - out.float()).abs().max() < 2e-2  # split-KV vs single pass


def to_paged_fast(cache, page_size, table=None):
    rows, capacity = cache.shape[:2]
    per_row = math.ceil(capacity / page_size)
    if table is None:
        table = torch.randperm(rows * per_row + 5, device=cache.device)[: rows * per_row].view(rows, per_row).int()
    pad = per_row * page_size - capacity
    src = torch.cat([cache, cache.new_zeros(rows, pad, *cache.shape[2:])], 1).view(rows * per_row, page_size,
                                                                                   *cache.shape[2:])
    paged = torch.zeros(rows * per_row + 5, page_size, *cache.shape[2:], dtype=cache.dtype, device=cache.device)
    paged[table.flatten().long()] = src
    return paged, table


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_compile():
    """A decoding step with device-side lengths needs no host sync: it captures into a CUDA graph,
    and the triton_ops trace under torch.compile."""
    torch.manual_seed(0)
    q, k_cache, v_cache, k, v, seqlens = make_case(2, 1, 32, 8, 128, [100, 4000], 1, 8192, torch.bfloat16, "cuda")
    want = flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=seqlens)
    static_out = None
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=seqlens)  # warm up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, want)
    step = torch.compile(lambda q, kc, vc, s: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=s, num_splits=4))
    got = step(q, k_cache, v_cache, seqlens + 1)
    ref = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens + 1, num_splits=4)
    assert torch.equal(got, ref)


@pytest.mark.gpu
def test_gpu_pdl_combine_equals_the_plain_launch(monkeypatch):
    """FLASHLAB_DECODE_PDL=1 (the combine as a programmatic dependent launch, Hopper): the same
    bits as the plain launch order, eagerly and replayed from a CUDA graph."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs Hopper")
    torch.manual_seed(2)
    q, k_cache, v_cache, _, _, seqlens = make_case(4, 1, 32, 8, 128, [100, 3000, 8000, 1], 0, 8192,
                                                   torch.bfloat16, "cuda")
    want = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, num_splits=8)
    monkeypatch.setenv("FLASHLAB_DECODE_PDL", "1")
    got = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, num_splits=8)
    assert torch.equal(got, want)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, num_splits=8)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, want)


@pytest.mark.gpu
def test_gpu_opcheck():
    q, k_cache, v_cache, k, v, seqlens = make_case(2, 3, 8, 2, 64, [5, 300], 3, 512, torch.bfloat16, "cuda")
    torch.library.opcheck(torch.ops.flashlab.kvcache_attn.default,
                          (q, k_cache, v_cache, seqlens, None, None, 0, 0.125, True, 2, 1))
    torch.library.opcheck(torch.ops.flashlab.kvcache_append.default, (k, v, k_cache, v_cache, seqlens, None, None))


@pytest.mark.gpu
def test_gpu_value_checks_on_request():
    """GPU index tensors are range-checked only with check_inputs=True (one device sync)."""
    q, k_cache, v_cache, k, v, _ = make_case(2, 1, 8, 2, 64, [0, 0], 1, 64, torch.float16, "cuda")
    full = torch.tensor([10, 64], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="cache too small: sequence 1 holds 64 tokens"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=full, check_inputs=True)
    pages = torch.randn(4, 16, 2, 64, dtype=torch.float16, device="cuda")
    table = torch.tensor([[0, 9], [1, 2]], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] = 9"):
        flash_attn_with_kvcache(q, pages, pages, cache_seqlens=torch.tensor([20, 3], dtype=torch.int32,
                                device="cuda"), block_table=table, check_inputs=True)
