"""flash-attn feature parity through the kernels (GPU, or the interpreter on CPU): variable-length
batches, sliding windows, ALiBi, softcap, dropout and SDPA masks — forward and backward, GQA."""

from __future__ import annotations

import pytest
import torch
from attn_checks import check_against_reference, make_qkv

import flashlab
from flashlab.reference import accuracy_check, naive_attention, reference_attention

F16 = torch.float16


@pytest.mark.parametrize(
    "window, causal, sq, sk",
    [((8, 0), False, 70, 70), ((5, 3), False, 61, 90), ((0, 0), False, 40, 40), ((-1, 4), False, 50, 33),
     ((7, -1), False, 45, 45), ((9, 2), True, 77, 50), ((16, 16), False, 130, 130)],
    ids=lambda x: str(x).replace(" ", ""),
)
def test_sliding_window(window, causal, sq, sk, device):
    torch.manual_seed(sq + sk)
    q, k, v = make_qkv(1, sq, sk, 4, 2, 40, F16, device)
    out = flashlab.flash_attn_func(q, k, v, causal=causal, window_size=window)
    check_against_reference(out, q, k, v, causal=causal, window_size=window)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # rows whose band reaches the poison
def test_window_visits_only_blocks_in_band(device):
    """Outside the band the kernel must not even read keys: poison them with NaN."""
    torch.manual_seed(0)
    q, k, v = make_qkv(1, 512, 512, 1, 1, 32, F16, device)
    k2, v2 = k.detach().clone(), v.detach().clone()
    # Rows ≥ 384 with left = 32 start at key 352; with any tile ≤ 128 the block holding them starts
    # its key loop at ≥ 256, so keys < 128 are outside every visited block. (A poisoned key inside a
    # visited block would leak NaN through p = 0 times v = NaN, which is legal for the kernel.)
    k2[:, :128] = float("nan")
    v2[:, :128] = float("nan")
    out = flashlab.flash_attn_func(q.detach(), k2, v2, window_size=(32, 0))
    assert out[:, 384:].isfinite().all()
    ref = reference_attention(q, k, v, window_size=(32, 0))
    assert (out[:, 384:].float() - ref[:, 384:]).abs().max() < 5e-3


@pytest.mark.parametrize("shape", ["heads", "batch-heads"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_alibi(shape, causal, device):
    torch.manual_seed(1)
    q, k, v = make_qkv(2, 45, 67, 4, 2, 32, F16, device)
    slopes = torch.rand(4 if shape == "heads" else (2, 4), dtype=torch.float32, device=device) * 0.5
    out = flashlab.flash_attn_func(q, k, v, causal=causal, alibi_slopes=slopes)
    check_against_reference(out, q, k, v, causal=causal, alibi_slopes=slopes)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_softcap(causal, device):
    torch.manual_seed(2)
    q, k, v = make_qkv(1, 57, 80, 6, 2, 48, F16, device)
    q.data *= 3  # push scores into tanh's saturating range
    out = flashlab.flash_attn_func(q, k, v, causal=causal, softcap=5.0)
    check_against_reference(out, q, k, v, causal=causal, softcap=5.0)


def test_features_combined(device):
    torch.manual_seed(3)
    q, k, v = make_qkv(2, 66, 91, 4, 1, 24, F16, device)
    slopes = torch.rand(4, device=device) * 0.3
    kw = dict(causal=True, window_size=(20, 0), softcap=8.0, alibi_slopes=slopes)
    out = flashlab.flash_attn_func(q, k, v, **kw)
    check_against_reference(out, q, k, v, **kw)


def _varlen_batch(lengths_q, lengths_k, heads, kv_heads, head_dim, device):
    def cu(lengths):
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(sum(lengths_q), heads, head_dim, dtype=F16, device=device, requires_grad=True)
    k = torch.randn(sum(lengths_k), kv_heads, head_dim, dtype=F16, device=device, requires_grad=True)
    v = torch.randn(sum(lengths_k), kv_heads, head_dim, dtype=F16, device=device, requires_grad=True)
    return q, k, v, cu(lengths_q), cu(lengths_k)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_matches_per_sequence_reference(causal, device):
    torch.manual_seed(4)
    lengths_q, lengths_k = [5, 0, 1, 70, 33], [9, 4, 1, 41, 33]
    q, k, v, cu_q, cu_k = _varlen_batch(lengths_q, lengths_k, 6, 2, 40, device)
    slopes = torch.rand(6, device=device) * 0.2
    out, lse, _ = flashlab.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=causal,
                                                  alibi_slopes=slopes, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (6, q.shape[0])
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    refs, lows = [], []
    for b in range(len(lengths_q)):
        qs, ks, vs = q[cu_q[b]:cu_q[b + 1]][None], k[cu_k[b]:cu_k[b + 1]][None], v[cu_k[b]:cu_k[b + 1]][None]
        kw = dict(causal=causal, alibi_slopes=slopes)
        refs.append(reference_attention(qs, ks, vs, dtype=torch.float64, **kw)[0])
        lows.append(naive_attention(qs, ks, vs, **kw)[0])
    ref, low = torch.cat(refs), torch.cat(lows)
    assert accuracy_check(out, ref, low).ok
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.double())
    low_grads = torch.autograd.grad(low, (q, k, v), g)
    for name, a, r, lo in zip("qkv", grads, ref_grads, low_grads):
        check = accuracy_check(a, r, lo, factor=3.0)
        assert check.ok, f"d{name}: {check}"


def test_varlen_equals_dense_on_equal_lengths(device):
    torch.manual_seed(5)
    q, k, v = (torch.randn(3, 37, 2, 32, dtype=F16, device=device) for _ in range(3))
    cu = torch.arange(0, 4 * 37, 37, dtype=torch.int32, device=device)
    packed = flashlab.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, 37, 37,
                                             causal=True)
    dense = flashlab.flash_attn_func(q, k, v, causal=True)
    assert torch.equal(packed.view_as(dense), dense)


@pytest.mark.parametrize("kind", ["bool", "float", "bool-broadcast"])
def test_sdpa_attn_mask(kind, device):
    torch.manual_seed(6)
    q, k, v = make_qkv(2, 35, 50, 4, 4, 32, F16, device, layout="bhsd")
    if kind == "bool":
        mask = torch.rand(2, 4, 35, 50, device=device) > 0.3
        mask[0, 1, 3] = False  # a fully masked row gives zeros
    elif kind == "float":
        mask = torch.randn(2, 1, 35, 50, device=device, dtype=F16)
    else:
        mask = torch.rand(35, 50, device=device) > 0.5
    out = flashlab.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    check_against_reference(out, q, k, v, layout="bhsd", attn_mask=mask)
    if kind == "bool":
        assert torch.all(out[0, 1, 3] == 0)


@pytest.mark.parametrize("shape", [(2, 40, 56, 4, 2, 32), (1, 37, 53, 6, 2, 40)], ids=["aligned", "odd-keys-gqa"])
def test_dropout_exact_against_its_pattern(shape, device):
    torch.manual_seed(7)
    batch, sq, sk, h, hk, d = shape
    q, k, v = make_qkv(batch, sq, sk, h, hk, d, F16, device)
    torch.manual_seed(123)
    out, _, keep = flashlab.flash_attn_func(q, k, v, dropout_p=0.3, causal=True, return_attn_probs=True)
    assert keep.shape == (batch, h, sq, sk) and keep.dtype == torch.bool
    check_against_reference(out, q, k, v, causal=True, dropout_keep=keep, dropout_p=0.3)
    torch.manual_seed(123)
    again = flashlab.flash_attn_func(q, k, v, dropout_p=0.3, causal=True)
    assert torch.equal(out, again), "torch.manual_seed must reproduce the dropout pattern"


def test_dropout_keep_rate(device):
    torch.manual_seed(8)
    q, k, v = make_qkv(2, 64, 64, 4, 4, 16, F16, device)
    _, _, keep = flashlab.flash_attn_func(q, k, v, dropout_p=0.25, return_attn_probs=True)
    rate = keep.float().mean().item()
    n = keep.numel()
    assert abs(rate - 0.75) < 5 * (0.75 * 0.25 / n) ** 0.5, rate  # within 5 sigma of Bernoulli(0.75)


def test_sdpa_dropout_changes_between_calls(device):
    q, k, v = make_qkv(1, 32, 32, 2, 2, 16, F16, device, layout="bhsd")
    a = flashlab.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    b = flashlab.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert not torch.equal(a, b)


def test_varlen_dropout_uses_the_documented_counters(device):
    """Packed rows draw counter (head · total + packed position) · counter_stride(max_seqlen_k) + key,
    as the CPU path and philox.py do (odd lengths: rows do not start on a group of eight keys);
    forward and gradients against the reference with that pattern, per sequence."""
    from flashlab import philox

    torch.manual_seed(10)
    cu = torch.tensor([0, 13, 30], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(30, 4, 16, dtype=F16, device=device, requires_grad=True) for _ in range(3))
    torch.manual_seed(11)
    out = flashlab.flash_attn_varlen_func(q, k, v, cu, cu, 17, 17, dropout_p=0.25)
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**62, (1,)).item())  # what the call drew
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    for a, b in [(0, 13), (13, 30)]:
        rows = (torch.arange(4)[:, None] * 30 + torch.arange(a, b)[None, :]) * philox.counter_stride(17)
        kw = dict(dropout_keep=philox.dropout_keep(seed, rows[..., None] + torch.arange(b - a), 0.25)[None].to(device),
                  dropout_p=0.25)
        qs, ks, vs = (t[a:b][None].detach().requires_grad_() for t in (q, k, v))
        ref = reference_attention(qs, ks, vs, dtype=torch.float64, **kw)
        low = naive_attention(qs, ks, vs, **kw)
        assert accuracy_check(out[a:b][None], ref, low).ok
        want = torch.autograd.grad(ref, (qs, ks, vs), g[a:b][None].double())
        same = torch.autograd.grad(low, (qs, ks, vs), g[a:b][None])
        for name, got, r, lo in zip("qkv", grads, want, same):
            check = accuracy_check(got[a:b][None], r, lo, factor=3.0)
            assert check.ok, f"d{name}: {check}"
