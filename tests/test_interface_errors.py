"""Bad input gets a ValueError/TypeError/NotImplementedError that names the argument."""

from __future__ import annotations

import pytest
import torch

import flashlab


def qkv(shape_q=(1, 8, 2, 16), shape_k=None, dtype=torch.float16):
    shape_k = shape_k or shape_q
    return torch.randn(shape_q, dtype=dtype), torch.randn(shape_k, dtype=dtype), torch.randn(shape_k, dtype=dtype)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: ([1.0], *qkv()[1:]), TypeError, "q must be a torch.Tensor"),
        (lambda: (torch.randn(8, 2, 16, dtype=torch.float16), *qkv()[1:]), ValueError, "q must have 4 dimensions"),
        (lambda: qkv(dtype=torch.float32), TypeError, "accepted: torch.float16, torch.bfloat16"),
        (lambda: (qkv()[0], *qkv(dtype=torch.bfloat16)[1:]), TypeError, "must share a dtype"),
        (lambda: qkv((2, 8, 2, 16), (1, 8, 2, 16)), ValueError, "batch size"),
        (lambda: qkv((1, 8, 2, 16), (1, 8, 2, 32)), ValueError, "head_dim of q"),
        (lambda: qkv((1, 8, 3, 16), (1, 8, 2, 16)), ValueError, "multiple of the number of heads"),
        (lambda: qkv((1, 8, 2, 320)), ValueError, "head_dim must be in 1..256"),
        (lambda: qkv((1, 8, 2, 0)), ValueError, "head_dim must be in 1..256"),
        (lambda: (*qkv()[:2], torch.randn(1, 9, 2, 16, dtype=torch.float16)), ValueError, "same shape"),
    ],
    ids=["not-tensor", "rank", "fp32", "mixed-dtype", "batch", "head-dim", "heads", "dim-too-big", "dim-zero",
         "kv-shape"],
)
def test_flash_attn_func_rejects(make, exc, match):
    with pytest.raises(exc, match=match):
        flashlab.flash_attn_func(*make())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dropout_p": 0.1}, "dropout_p"),
        ({"window_size": (4, 0)}, "window_size"),
        ({"softcap": 30.0}, "softcap"),
        ({"alibi_slopes": torch.ones(2)}, "alibi_slopes"),
    ],
    ids=["dropout", "window", "softcap", "alibi"],
)
def test_later_options_raise_not_implemented(kwargs, match):
    with pytest.raises(NotImplementedError, match=match):
        flashlab.flash_attn_func(*qkv(), **kwargs)


def test_bad_softmax_scale():
    with pytest.raises(TypeError, match="softmax_scale"):
        flashlab.flash_attn_func(*qkv(), softmax_scale="0.1")


def test_sdpa_errors():
    q = torch.randn(1, 4, 8, 16, dtype=torch.float16)
    kv = torch.randn(1, 2, 8, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        flashlab.scaled_dot_product_attention(q, kv, kv)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        flashlab.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="dropout_p"):
        flashlab.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
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
