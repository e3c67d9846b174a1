"""flashlab.MultiheadAttention against torch.nn.MultiheadAttention (copied weights), and flashlab.Attention
against the reference attention on its own projections. Accuracy: ANCHORS.md's rule, with the fp64
module as the reference and the fp16 module as the same-dtype baseline."""

from __future__ import annotations

import copy

import pytest
import torch

import flashlab
from flashlab.reference import accuracy_check, naive_attention
from flashlab.rotary import apply_rotary


def _torch_mha(batch_first: bool = True, **kwargs) -> torch.nn.MultiheadAttention:
    torch.manual_seed(0)
    m = torch.nn.MultiheadAttention(32, 2, batch_first=batch_first, **kwargs)
    with torch.no_grad():  # non-zero biases, so that a bias mix-up shows
        for name, p in m.named_parameters():
            if "bias" in name:
                p.normal_()
    return m.eval()


def _inputs(batch_first: bool, seqlen_q: int = 12, seqlen_k: int = 12, kdim: int = 32,
            device: str = "cpu") -> tuple[torch.Tensor, ...]:
    q = torch.randn(3, seqlen_q, 32, dtype=torch.float64).to(device)
    k = torch.randn(3, seqlen_k, kdim, dtype=torch.float64).to(device)
    v = torch.randn(3, seqlen_k, kdim, dtype=torch.float64).to(device)
    return (q, k, v) if batch_first else tuple(t.transpose(0, 1) for t in (q, k, v))


def _check_mha(ours_module, ref_module, inputs, factor: float = 2.0, **kwargs) -> None:
    """ours (fp16) vs torch's module in fp64 (reference) and in fp16 (same-dtype baseline), on the
    inputs' device."""
    device = inputs[0].device
    ours = ours_module.half().to(device)
    ref_module = copy.deepcopy(ref_module).to(device)
    out, weights = ours(*(t.half() for t in inputs), need_weights=False, **kwargs)
    assert weights is None
    high = copy.deepcopy(ref_module).double()(*inputs, need_weights=False, **kwargs)[0]
    low_kwargs = {k: (v.half() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                  for k, v in kwargs.items()}
    low = copy.deepcopy(ref_module).half()(*(t.half() for t in inputs), need_weights=False, **low_kwargs)[0]
    assert out.shape == high.shape and out.dtype == torch.float16
    check = accuracy_check(out, high, low, factor=factor)
    assert check.ok, str(check)


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_matches_torch_self_attention_with_masks(batch_first, device):
    ref = _torch_mha(batch_first)
    ours = flashlab.MultiheadAttention.from_torch(ref)
    x = _inputs(batch_first, device=device)[0]
    padding = torch.zeros(3, 12, dtype=torch.bool, device=device)
    padding[1, 9:] = True  # the last 3 keys of sequence 1 are padding
    _check_mha(ours, ref, (x, x, x))
    _check_mha(flashlab.MultiheadAttention.from_torch(ref), ref, (x, x, x), key_padding_mask=padding)
    causal = torch.ones(12, 12, dtype=torch.bool, device=device).triu(1)  # True = not allowed (MHA's convention)
    _check_mha(flashlab.MultiheadAttention.from_torch(ref), ref, (x, x, x), attn_mask=causal, is_causal=True)
    _check_mha(flashlab.MultiheadAttention.from_torch(ref), ref, (x, x, x), attn_mask=causal,
               key_padding_mask=padding)


def test_mha_cross_attention_kdim_vdim_float_mask(device):
    ref = _torch_mha(kdim=24, vdim=24)
    ours = flashlab.MultiheadAttention.from_torch(ref)
    assert ours.in_proj_weight is None and ours.k_proj_weight.shape == (32, 24)
    q, k, v = _inputs(True, seqlen_q=10, seqlen_k=17, kdim=24, device=device)
    bias = torch.randn(3 * 2, 10, 17, dtype=torch.float64, device=device)  # per (batch, head) additive mask
    _check_mha(ours, ref, (q, k, v), attn_mask=bias)


def test_mha_is_causal_without_mask_uses_the_kernel_mask(device):
    ref = _torch_mha()
    x = _inputs(True, device=device)[0]
    ours = flashlab.MultiheadAttention.from_torch(ref).half().to(device)
    got = ours(x.half(), x.half(), x.half(), need_weights=False, is_causal=True)[0]
    mask = torch.ones(12, 12, dtype=torch.bool, device=device).triu(1)
    want = ours(x.half(), x.half(), x.half(), need_weights=False, attn_mask=mask)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_mha_gradients_match_torch(device):
    ref = _torch_mha().to(device)
    ours = flashlab.MultiheadAttention.from_torch(ref).half()
    x = _inputs(True, device=device)[0]
    x16 = x.half().requires_grad_()
    out = ours(x16, x16, x16, need_weights=False)[0]
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x16, g)
    x64, x_low = x.clone().requires_grad_(), x.half().requires_grad_()
    high = copy.deepcopy(ref).double()(x64, x64, x64, need_weights=False)[0]
    low = copy.deepcopy(ref).half()(x_low, x_low, x_low, need_weights=False)[0]
    (want,) = torch.autograd.grad(high, x64, g.double())
    (same,) = torch.autograd.grad(low, x_low, g)
    check = accuracy_check(got, want, same, factor=3.0)
    assert check.ok, str(check)


@pytest.mark.parametrize("kwargs", [{}, {"bias": False}, {"kdim": 24, "vdim": 16}])
def test_mha_state_dict_round_trip(kwargs):
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True, **kwargs)
    ours = flashlab.MultiheadAttention(32, 4, batch_first=True, **kwargs)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    back = torch.nn.MultiheadAttention(32, 4, batch_first=True, **kwargs)
    back.load_state_dict(ours.state_dict())
    for (name, a), b in zip(ref.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_mha_argument_errors():
    m = flashlab.MultiheadAttention(32, 2, batch_first=True)
    x = torch.randn(2, 8, 32)
    with pytest.raises(NotImplementedError, match="need_weights=False"):
        m(x, x, x)
    with pytest.raises(NotImplementedError, match="add_bias_kv"):
        flashlab.MultiheadAttention(32, 2, add_bias_kv=True)
    with pytest.raises(ValueError, match="divisible"):
        flashlab.MultiheadAttention(30, 4)
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(L, S\) = \(8, 8\)"):
        m(x, x, x, need_weights=False, attn_mask=torch.zeros(8, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape"):
        m(x, x, x, need_weights=False, key_padding_mask=torch.zeros(2, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="module must be a torch.nn.MultiheadAttention"):
        flashlab.MultiheadAttention.from_torch(torch.nn.Linear(2, 2))


def _layer_reference(layer: flashlab.Attention, x: torch.Tensor, dtype: torch.dtype,
                     positions: torch.Tensor) -> torch.Tensor:
    """The layer computed with naive attention in ``dtype`` (its parameters cast to it)."""
    ref = copy.deepcopy(layer).to(dtype)
    q, k, v = ref.split_qkv(x.to(dtype))
    if ref.rotary is not None:
        cos, sin = ref.rotary(positions, dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    return ref.out(naive_attention(q, k, v, causal=ref.causal).flatten(-2))


@pytest.mark.parametrize("rotary_base", [None, 10000.0])
def test_attention_layer_gqa_causal_rotary(rotary_base):
    torch.manual_seed(1)
    layer = flashlab.Attention(48, num_heads=6, num_kv_heads=2, head_dim=16, rotary_base=rotary_base, bias=True,
                               dtype=torch.float16)
    x = torch.randn(2, 19, 48, dtype=torch.float16)
    out = layer(x)
    pos = torch.arange(19)
    check = accuracy_check(out, _layer_reference(layer, x, torch.float64, pos),
                           _layer_reference(layer, x, torch.float16, pos))
    assert check.ok, str(check)


def test_attention_layer_packed_sequences_restart_positions():
    """Packed (varlen) input: each sequence attends only to itself, rotary positions restart at 0."""
    torch.manual_seed(2)
    layer = flashlab.Attention(32, num_heads=2, rotary_base=10000.0, dtype=torch.float16)
    lengths = [5, 11, 3]
    x = torch.randn(sum(lengths), 32, dtype=torch.float16)
    cu = torch.tensor([0, 5, 16, 19], dtype=torch.int32)
    out = layer(x, cu_seqlens=cu, max_seqlen=11)
    pieces = x.split(lengths)
    high = torch.cat([_layer_reference(layer, p[None], torch.float64, torch.arange(len(p)))[0] for p in pieces])
    low = torch.cat([_layer_reference(layer, p[None], torch.float16, torch.arange(len(p)))[0] for p in pieces])
    check = accuracy_check(out, high, low)
    assert check.ok, str(check)


def test_rotary_is_relative_and_norm_preserving():
    rope = flashlab.RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 16, dtype=torch.float64)

    def score(pq: int, pk: int) -> torch.Tensor:
        cq, sq = rope(torch.tensor([pq]), torch.float64)
        ck, sk = rope(torch.tensor([pk]), torch.float64)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    # The angle table is fp32 (as in Llama): at position ~100 its angles carry ~1e-5 of rounding.
    torch.testing.assert_close(score(7, 3), score(104, 100), rtol=1e-5, atol=1e-5)
    cos, sin = rope(torch.tensor([0, 9]), torch.float64)
    rotated = apply_rotary(torch.cat([q, q]), cos, sin)
    torch.testing.assert_close(rotated[0], q[0])  # position 0 is the identity
    torch.testing.assert_close(rotated.norm(dim=-1), torch.cat([q, q]).norm(dim=-1))


def test_attention_layer_argument_errors():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        flashlab.Attention(32, num_heads=4, num_kv_heads=3, head_dim=8)
    with pytest.raises(ValueError, match="even int"):
        flashlab.Attention(30, num_heads=2, rotary_base=10000.0)
    layer = flashlab.Attention(32, num_heads=2)
    with pytest.raises(ValueError, match=r"x must be \(batch, seqlen, dim\) with dim=32, got \(4, 31\)"):
        layer(torch.randn(4, 31))
    with pytest.raises(ValueError, match="max_seqlen is required"):
        layer(torch.randn(4, 32), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
