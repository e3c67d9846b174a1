"""Decoding kernels: a few new queries against a long, possibly paged, KV cache (flash-decoding).

Decoding is memory-bound: every K/V byte of the cache is read once per step, and the work per
byte is tiny. Three choices follow from that:

* **GQA in the M dimension.** One program serves one kv head: its tile's rows are the
  ``seqlen_q × group`` (query position, query head) pairs that read this kv head, row
  ``r = t · group + g`` for query position ``t`` and head ``kv_head · group + g``. Each K/V tile is
  loaded once for all of them (padded to ≥ 16 rows for ``tl.dot``).
* **Split-KV.** At small batch, ``batch × kv_heads`` programs leave most SMs idle, so the keys of
  a sequence are cut into ``num_splits`` chunks, one program each; every program writes a
  normalized partial output and its log-sum-exp (fp32 scratch), and ``decode_combine_kernel``
  merges them. Chunks are sized from each sequence's *real* length on the device
  (``cache_seqlens[b] + seqlen_new``), never less than ``min_chunk`` keys, so short sequences use
  fewer splits and their idle programs exit at once.
* **Paged cache.** With ``PAGED``, key position ``j`` of sequence ``b`` lives in page
  ``block_table[b, j // PAGE_SIZE]``, slot ``j % PAGE_SIZE``; any page size works (when it is a
  multiple of ``BLOCK_N`` a whole key tile shares one page and one table read).

Causal masking is bottom-right over the total key length ``n_keys``: query ``t`` sees key ``j`` iff
``j <= t + n_keys - seqlen_q``; a sliding window ``(left, right)``, softcap and ALiBi follow the
training kernels (masking.py, scores.py) with the same alignment, and keys outside the band are
never loaded. Scores live in the log2 domain (``exp2``); LSEs written out are natural log, -inf for
rows that see no key (their output is 0).
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from flashlab.kernels.forward import LN2, LOG2E, M_INIT, online_softmax_step, shifted_scores


@triton.jit
def split_range(n_keys, seqlen_q, window_left, num_splits, min_chunk, BLOCK_N: tl.constexpr,
                HAS_LOWER: tl.constexpr):
    """(first key, keys per split) of a sequence of ``n_keys``: splits cut [key_lo, n_keys), where
    key_lo is 0, or with a window the first key its first query sees (rounded down to BLOCK_N).
    The chunk is a multiple of BLOCK_N, at least ``min_chunk``; splits ``s >= cdiv(n_keys - key_lo,
    chunk)`` have no keys (both kernels agree on this)."""
    key_lo = 0
    if HAS_LOWER:
        key_lo = tl.maximum(n_keys - seqlen_q - window_left, 0) // BLOCK_N * BLOCK_N
    chunk = tl.cdiv(tl.cdiv(n_keys - key_lo, num_splits), BLOCK_N) * BLOCK_N
    return key_lo, tl.maximum(chunk, min_chunk)


@triton.jit
def _row_offsets(cols, start_n, n_keys, bt_row, stride_kb, stride_ks, stride_vb, stride_vs,
                 PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """Element offsets of key positions ``cols`` in K and V (relative to the kv head's base)."""
    if PAGED:
        if PAGE_SIZE % BLOCK_N == 0:
            # The whole tile is in one page: one table read (start_n < n_keys inside the loops).
            page = tl.load(bt_row + start_n // PAGE_SIZE).to(tl.int64)
        elif MASKED:
            page = tl.load(bt_row + cols // PAGE_SIZE, mask=cols < n_keys, other=0).to(tl.int64)
        else:
            page = tl.load(bt_row + cols // PAGE_SIZE).to(tl.int64)
        slot = cols % PAGE_SIZE
        return page * stride_kb + slot * stride_ks, page * stride_vb + slot * stride_vs
    return cols.to(tl.int64) * stride_ks, cols.to(tl.int64) * stride_vs


@triton.jit
def _load_rows(ptrs, cols, n_keys, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        if BLOCK_D == HEAD_DIM:
            return tl.load(ptrs, mask=cols[:, None] < n_keys, other=0.0)
        return tl.load(ptrs, mask=(cols[:, None] < n_keys) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if BLOCK_D == HEAD_DIM:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _decode_inner(acc, l_i, m_i, q, k_base, v_base, bt_row, stride_kb, stride_ks, stride_vb, stride_vs,
                  t, offs_d, lo, hi, n_keys, seqlen_q, diag, left, right, qk_scale, cap_in, cap_out, slope,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
                  PAGED: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_LOWER: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, MASKED: tl.constexpr):
    """Fold key tiles [lo, hi) into the running (acc, l_i, m_i). ``t``: query position per row;
    ``slope``: the ALiBi slope per row ([BLOCK_M, 1]). MASKED tiles check the key bound and the
    causal / window band (masking.visible); softcap and ALiBi apply to every tile (scores.py)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_rows, v_rows = _row_offsets(cols, start_n, n_keys, bt_row, stride_kb, stride_ks, stride_vb, stride_vs,
                                      PAGE_SIZE, PAGED, BLOCK_N, MASKED)
        k = _load_rows(k_base + k_rows[:, None] + offs_d[None, :], cols, n_keys, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        s, m_ij = shifted_scores(tl.dot(q, tl.trans(k)), m_i, t[:, None], cols[None, :], seqlen_q, n_keys, diag,
                                 left, right, qk_scale, cap_in, cap_out, slope, k_base, 0, 0, MASKED, HAS_UPPER,
                                 HAS_LOWER, HAS_SOFTCAP, HAS_ALIBI, 0)
        p, l_i, acc = online_softmax_step(s, m_i, m_ij, l_i, acc)
        v = _load_rows(v_base + v_rows[:, None] + offs_d[None, :], cols, n_keys, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def decode_attn_kernel(
    Q, K, V, O, LSE, O_PART, LSE_PART, SEQLENS, BATCH_IDX, BT, SLOPES,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_btb, stride_sb, stride_sh,
    batch, seqlen_q, seqlen_new, capacity, heads, group_size, num_splits, min_chunk, softmax_scale,
    window_left, window_right, cap_in, cap_out,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, HAS_UPPER: tl.constexpr,
    HAS_LOWER: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, SPLIT: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """One (split, kv head × row block, sequence). Without SPLIT: O[b, t, h] (q's dtype) and
    LSE[b, h, t]. With SPLIT: the split's normalized partial O_PART[s, b, t·heads + h, :] and its
    LSE_PART[s, b, t·heads + h] (fp32, log2 units) for ``decode_combine_kernel``.

    PDL (Hopper, with the combine launched as a programmatic dependent): let the combine kernel's
    programs start once every program here has, so its launch overlaps this kernel's tail.

    Grid: (num_splits, kv_heads · cdiv(seqlen_q · group_size, BLOCK_M), batch).
    """
    if PDL:
        gdc_launch_dependents()
    split = tl.program_id(0)
    n_mblocks = tl.cdiv(seqlen_q * group_size, BLOCK_M)
    hk = tl.program_id(1) // n_mblocks
    start_m = (tl.program_id(1) % n_mblocks) * BLOCK_M
    b = tl.program_id(2).to(tl.int64)

    # Clamped to the capacity so a bad cache_seqlens can never read outside the cache.
    n_keys = tl.minimum(tl.load(SEQLENS + b) + seqlen_new, capacity)
    key_lo, chunk = split_range(n_keys, seqlen_q, window_left, num_splits, min_chunk, BLOCK_N, HAS_LOWER)
    lo = key_lo + split * chunk
    if SPLIT:
        if lo >= n_keys:
            return  # an idle split: the combine kernel never reads it
    hi = tl.minimum(lo + chunk, n_keys)
    diag = n_keys - seqlen_q
    # The band (masking.py) of this tile's query positions [first_t, last_t]: keys past the last
    # row's upper edge or before the first row's lower edge are hidden from the whole tile; keys
    # inside [last row's lower edge, first row's upper edge] are visible to all of it (no mask).
    first_t = start_m // group_size
    last_t = tl.minimum((start_m + BLOCK_M - 1) // group_size, seqlen_q - 1)
    open_hi = hi
    if HAS_UPPER:
        hi = tl.minimum(hi, last_t + diag + window_right + 1)
        open_hi = tl.minimum(hi, first_t + diag + window_right + 1)
    full_lo = lo
    if HAS_LOWER:
        lo = tl.maximum(lo, tl.maximum(first_t + diag - window_left, 0) // BLOCK_N * BLOCK_N)
        full_lo = tl.minimum(tl.maximum(lo, tl.cdiv(tl.maximum(last_t + diag - window_left, 0), BLOCK_N) * BLOCK_N),
                             hi)
    full_hi = full_lo + tl.maximum(open_hi - full_lo, 0) // BLOCK_N * BLOCK_N

    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen_q * group_size
    t = rows // group_size
    h = hk * group_size + rows % group_size
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + b * stride_qb + t[:, None] * stride_qs + h[:, None] * stride_qh + offs_d[None, :]
    if BLOCK_D == HEAD_DIM:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)

    if PAGED:
        k_base = K + hk * stride_kh
        v_base = V + hk * stride_vh
    else:
        cache_row = b
        if HAS_BATCH_IDX:
            cache_row = tl.load(BATCH_IDX + b).to(tl.int64)
        k_base = K + cache_row * stride_kb + hk * stride_kh
        v_base = V + cache_row * stride_vb + hk * stride_vh
    bt_row = BT + b * stride_btb

    # Inductor types Python floats fp64 in the launches it generates (this kernel's op is a
    # triton_op, traced by torch.compile): keep the arithmetic fp32.
    qk_scale = tl.cast(softmax_scale, tl.float32) * LOG2E
    cap_in = tl.cast(cap_in, tl.float32)
    cap_out = tl.cast(cap_out, tl.float32)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + b * stride_sb + h * stride_sh)[:, None]
    m_i = tl.full([BLOCK_M], M_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_LOWER:  # the band's lower edge: masked tiles first
        acc, l_i, m_i = _decode_inner(acc, l_i, m_i, q, k_base, v_base, bt_row, stride_kb, stride_ks, stride_vb,
                                      stride_vs, t, offs_d, lo, full_lo, n_keys, seqlen_q, diag, window_left,
                                      window_right, qk_scale, cap_in, cap_out, slope, BLOCK_N, HEAD_DIM, BLOCK_D,
                                      PAGE_SIZE, PAGED, HAS_UPPER, HAS_LOWER, HAS_SOFTCAP, HAS_ALIBI, True)
    acc, l_i, m_i = _decode_inner(acc, l_i, m_i, q, k_base, v_base, bt_row, stride_kb, stride_ks, stride_vb,
                                  stride_vs, t, offs_d, full_lo, full_hi, n_keys, seqlen_q, diag, window_left,
                                  window_right, qk_scale, cap_in, cap_out, slope, BLOCK_N, HEAD_DIM, BLOCK_D,
                                  PAGE_SIZE, PAGED, HAS_UPPER, HAS_LOWER, HAS_SOFTCAP, HAS_ALIBI, False)
    acc, l_i, m_i = _decode_inner(acc, l_i, m_i, q, k_base, v_base, bt_row, stride_kb, stride_ks, stride_vb,
                                  stride_vs, t, offs_d, full_hi, hi, n_keys, seqlen_q, diag, window_left,
                                  window_right, qk_scale, cap_in, cap_out, slope, BLOCK_N, HEAD_DIM, BLOCK_D,
                                  PAGE_SIZE, PAGED, HAS_UPPER, HAS_LOWER, HAS_SOFTCAP, HAS_ALIBI, True)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
    d_ok = offs_d[None, :] < HEAD_DIM
    if SPLIT:
        part_row = (split * batch + b) * (seqlen_q * heads) + t * heads + h
        tl.store(LSE_PART + part_row, lse2, mask=row_ok)
        tl.store(O_PART + part_row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None] & d_ok)
    else:
        tl.store(LSE + (b * heads + h) * seqlen_q + t, lse2 * LN2, mask=row_ok)
        o_ptrs = O + b * stride_ob + t[:, None] * stride_os + h[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok)


@triton.jit
def decode_combine_kernel(
    O, LSE, O_PART, LSE_PART, SEQLENS,
    stride_ob, stride_os, stride_oh,
    batch, seqlen_q, seqlen_new, capacity, heads, num_splits, min_chunk, window_left,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS_P2: tl.constexpr,
    HAS_LOWER: tl.constexpr, PDL: tl.constexpr = False,
):
    """Merge the active splits of one output row (query position t, head h) by log-sum-exp:
    O = Σ_s w_s O_s / Σ_s w_s with w_s = 2^(lse_s - max lse). PDL: launched as a programmatic
    dependent of the split kernel, it waits for that grid's writes before reading the partials.
    Grid: (seqlen_q · heads, batch)."""
    row = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t = row // heads
    h = row % heads
    n_keys = tl.minimum(tl.load(SEQLENS + b) + seqlen_new, capacity)
    key_lo, chunk = split_range(n_keys, seqlen_q, window_left, num_splits, min_chunk, BLOCK_N, HAS_LOWER)
    n_active = tl.cdiv(n_keys - key_lo, chunk)

    offs_s = tl.arange(0, SPLITS_P2)
    s_ok = offs_s < n_active
    part_row = (offs_s * batch + b) * (seqlen_q * heads) + row
    if PDL:
        gdc_wait()  # the split kernel's partials (and everything before it) are visible after this
    lse = tl.load(LSE_PART + part_row, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m)
    l = tl.sum(w, 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    o = tl.load(O_PART + part_row[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                other=0.0)
    l_safe = tl.where(l == 0.0, 1.0, l)
    acc = tl.sum(o * w[:, None], 0) / l_safe
    lse_out = tl.where(l == 0.0, float("-inf"), (m + tl.math.log2(l_safe)) * LN2)
    tl.store(LSE + (b * heads + h) * seqlen_q + t, lse_out)
    tl.store(O + b * stride_ob + t * stride_os + h * stride_oh + offs_d, acc.to(O.dtype.element_ty), mask=d_ok)


@triton.jit
def kvcache_append_kernel(
    K_NEW, V_NEW, K, V, SEQLENS, BATCH_IDX, BT,
    stride_knb, stride_kns, stride_knh,
    stride_vnb, stride_vns, stride_vnh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_btb, seqlen_new, capacity,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr,
):
    """Write K_NEW[b, i, hk] / V_NEW[b, i, hk] into the cache at position cache_seqlens[b] + i (through
    the block table when PAGED). Positions at or past ``capacity`` are dropped, never written.
    Grid: (cdiv(seqlen_new, BLOCK_S), kv_heads, batch)."""
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_i = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    pos = tl.load(SEQLENS + b) + offs_i
    ok = (offs_i < seqlen_new) & (pos < capacity) & (pos >= 0)
    if PAGED:
        page = tl.load(BT + b * stride_btb + pos // PAGE_SIZE, mask=ok, other=0).to(tl.int64)
        slot = pos % PAGE_SIZE
        k_dst = K + page * stride_kb + slot * stride_ks
        v_dst = V + page * stride_vb + slot * stride_vs
    else:
        cache_row = b
        if HAS_BATCH_IDX:
            cache_row = tl.load(BATCH_IDX + b).to(tl.int64)
        k_dst = K + cache_row * stride_kb + pos.to(tl.int64) * stride_ks
        v_dst = V + cache_row * stride_vb + pos.to(tl.int64) * stride_vs
    mask = ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    src = offs_i[:, None] * stride_kns + offs_d[None, :]
    k = tl.load(K_NEW + b * stride_knb + hk * stride_knh + src, mask=mask)
    tl.store(k_dst[:, None] + hk * stride_kh + offs_d[None, :], k, mask=mask)
    src = offs_i[:, None] * stride_vns + offs_d[None, :]
    v = tl.load(V_NEW + b * stride_vnb + hk * stride_vnh + src, mask=mask)
    tl.store(v_dst[:, None] + hk * stride_vh + offs_d[None, :], v, mask=mask)
