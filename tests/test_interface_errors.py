"""Bad input gets a ValueError/TypeError/NotImplementedError that names the argument."""

from __future__ import annotations

import pytest
import torch

import flashlab


def qkv(shape_q=(1, 8, 2, 16), shape_k=None, dtype=torch.float16):
    shape_k = shape_k or shape_q
    return tuple(torch.randn(shape).to(dtype) for shape in (shape_q, shape_k, shape_k))


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: ([1.0], *qkv()[1:]), TypeError, "q must be a torch.Tensor"),
        (lambda: (torch.randn(8, 2, 16, dtype=torch.float16), *qkv()[1:]), ValueError, "q must have 4 dimensions"),
        (lambda: qkv(dtype=torch.int32), TypeError, "accepted: torch.float16, torch.bfloat16"),
        (lambda: (qkv()[0], *qkv(dtype=torch.bfloat16)[1:]), TypeError, "must share a dtype"),
        (lambda: qkv((2, 8, 2, 16), (1, 8, 2, 16)), ValueError, "batch size"),
        (lambda: qkv((1, 8, 2, 16), (1, 8, 2, 32)), ValueError, "head_dim of q"),
        (lambda: qkv((1, 8, 3, 16), (1, 8, 2, 16)), ValueError, "multiple of the number of heads"),
        (lambda: qkv((1, 8, 2, 320)), ValueError, "head_dim must be in 1..256"),
        (lambda: qkv((1, 8, 2, 0)), ValueError, "head_dim must be in 1..256"),
        (lambda: (*qkv()[:2], torch.randn(1, 9, 2, 16, dtype=torch.float16)), ValueError, "same shape"),
    ],
    ids=["not-tensor", "rank", "int32", "mixed-dtype", "batch", "head-dim", "heads", "dim-too-big", "dim-zero",
         "kv-shape"],
)
def test_flash_attn_func_rejects(make, exc, match):
    with pytest.raises(exc, match=match):
        flashlab.flash_attn_func(*make())


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"dropout_p": 1.0}, ValueError, r"dropout_p must be a float in \[0, 1\)"),
        ({"dropout_p": -0.1}, ValueError, "dropout_p"),
        ({"window_size": (-2, 0)}, ValueError, "window_size left must be an int ≥ -1"),
        ({"window_size": 5}, ValueError, "window_size must be a pair"),
        ({"softcap": -1.0}, ValueError, "softcap must be a finite float ≥ 0"),
        ({"alibi_slopes": torch.ones(3)}, ValueError, r"alibi_slopes must have shape \(2,\) or \(1, 2\)"),
        ({"alibi_slopes": torch.ones(2, dtype=torch.float16)}, TypeError, "alibi_slopes must be float32"),
        ({"alibi_slopes": [0.5, 0.5]}, TypeError, "alibi_slopes must be a torch.Tensor"),
    ],
    ids=["dropout-1", "dropout-neg", "window-lt-minus-1", "window-not-pair", "softcap-neg", "alibi-shape",
         "alibi-dtype", "alibi-list"],
)
def test_feature_arguments_rejected(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        flashlab.flash_attn_func(*qkv(), **kwargs)


def _packed(total=10, heads=2):
    return (torch.randn(total, heads, 16, dtype=torch.float16) for _ in range(3))


@pytest.mark.parametrize(
    "cu_q, max_q, exc, match",
    [
        (torch.tensor([0, 4, 10], dtype=torch.int64), 6, TypeError, "cu_seqlens_q must be int32"),
        (torch.tensor([0, 6, 4, 10], dtype=torch.int32), 6, ValueError, "non-decreasing"),
        (torch.tensor([1, 4, 10], dtype=torch.int32), 6, ValueError, "start at 0"),
        (torch.tensor([0, 4, 9], dtype=torch.int32), 6, ValueError, "must equal the number of packed tokens"),
        (torch.tensor([0, 4, 10], dtype=torch.int32), 5, ValueError, "max_seqlen_q must be an int ≥"),
        (torch.tensor([[0, 4, 10]], dtype=torch.int32), 6, ValueError, "must be 1-D"),
    ],
    ids=["dtype", "non-monotonic", "start", "total", "max-too-small", "rank"],
)
def test_varlen_arguments_rejected(cu_q, max_q, exc, match):
    q, k, v = _packed()
    cu_k = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(exc, match=match):
        flashlab.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, 6)


def test_varlen_batch_mismatch():
    q, k, v = _packed()
    with pytest.raises(ValueError, match="same length"):
        flashlab.flash_attn_varlen_func(q, k, v, torch.tensor([0, 10], dtype=torch.int32),
                                        torch.tensor([0, 4, 10], dtype=torch.int32), 10, 6)


def test_bad_softmax_scale():
    with pytest.raises(TypeError, match="softmax_scale"):
        flashlab.flash_attn_func(*qkv(), softmax_scale="0.1")


def test_sdpa_errors():
    q = torch.randn(1, 4, 8, 16, dtype=torch.float16)
    kv = torch.randn(1, 2, 8, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        flashlab.scaled_dot_product_attention(q, kv, kv)
    with pytest.raises(ValueError, match="does not broadcast"):
        flashlab.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(7, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be bool or a floating dtype"):
        flashlab.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="not both"):
        flashlab.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match="dropout_p"):
        flashlab.scaled_dot_product_attention(q, q, q, dropout_p=1.5)
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        flashlab.scaled_dot_product_attention(q[0, 0], q[0, 0], q[0, 0])
    with pytest.raises(ValueError, match="same rank"):
        flashlab.scaled_dot_product_attention(q, q[0], q[0])
    with pytest.raises(TypeError, match="scale"):
        flashlab.scaled_dot_product_attention(q, q, q, scale=float("nan"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA tensors")
def test_mixed_devices():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="one device"):
        flashlab.flash_attn_func(q.cuda(), k, v)


def test_tensors_past_32_bit_offsets_are_rejected():
    """The kernels' row offsets are 32-bit within a batch element: larger tensors get a ValueError
    naming the tensor, not wrong results (meta tensors: shapes without memory)."""
    from flashlab import checks

    def meta(*shape):
        return torch.empty(shape, dtype=torch.float16, device="meta")

    small = meta(2, 1024, 16, 128)
    checks.check_qkv(small, small, small, ("q", "k", "v"), 4, 2, checks.KERNEL_DTYPES, kernels=True)
    edge = meta(2, 2**20, 16, 128)  # one batch element holds 2^31 elements: offsets 0 .. 2^31 - 1 fit
    checks.check_qkv(small, edge, edge, ("q", "k", "v"), 4, 2, checks.KERNEL_DTYPES, kernels=True)
    big = meta(2, 2**20 + 1, 16, 128)
    with pytest.raises(ValueError, match=r"one batch element of k spans 2,147,485,696 elements.*32-bit"):
        checks.check_qkv(small, big, big, ("q", "k", "v"), 4, 2, checks.KERNEL_DTYPES, kernels=True)
    checks.check_qkv(small, big, big, ("q", "k", "v"), 4, 2, checks.KERNEL_DTYPES, kernels=False)  # CPU path
    # Packed varlen tensors have no batch axis: the whole tensor counts.
    packed = meta(2**20 + 1, 16, 128)
    with pytest.raises(ValueError, match=r"^q spans"):
        checks.check_qkv(packed, packed, packed, ("q", "k", "v"), 3, 1, checks.KERNEL_DTYPES, batch_axis=None,
                         kernels=True)
    # A strided view counts its reach, not its element count: every third row of a big buffer.
    view = meta(1, 3 * 2**19, 16, 128)[:, ::3]
    with pytest.raises(ValueError, match="spans"):
        checks.check_qkv(view, view, view, ("q", "k", "v"), 4, 2, checks.KERNEL_DTYPES, kernels=True)
