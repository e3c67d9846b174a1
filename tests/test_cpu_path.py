"""Without a GPU and without the interpreter, the public API runs blockwise.py (the CPU path)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from attn_checks import check_against_reference, make_qkv
from hypothesis import given, settings
from hypothesis import strategies as st

import flashlab
from flashlab import philox


@pytest.fixture
def cpu_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=["fp16", "fp32", "fp64"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_attn_func_on_cpu_path(cpu_path, causal, dtype):
    """The CPU path also takes fp32 and fp64 (the kernels fp16/bf16 only), e.g. for a module's fp64 reference."""
    torch.manual_seed(0)
    q, k, v = make_qkv(2, 113, 203, 6, 2, 80, dtype, "cpu")
    out = flashlab.flash_attn_func(q, k, v, causal=causal)
    check_against_reference(out, q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_sdpa_on_cpu_path_matches_pytorch(cpu_path, dtype):
    torch.manual_seed(1)
    q, k, v = make_qkv(2, 70, 90, 4, 4, 32, dtype, "cpu", layout="bhsd")
    out = flashlab.scaled_dot_product_attention(q, k, v, is_causal=True)
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert (out.double() - want).abs().max() < tol
    out.sum().backward()
    assert q.grad is not None and q.grad.isfinite().all()


def test_cpu_path_rejects_what_it_cannot_run(cpu_path):
    q = torch.ones(1, 2, 8, 16, dtype=torch.int32)
    with pytest.raises(TypeError, match="accepted"):
        flashlab.scaled_dot_product_attention(q, q, q)


def test_varlen_on_cpu_path(cpu_path):
    torch.manual_seed(2)
    lengths = [3, 0, 17]
    cu = torch.tensor([0, 3, 3, 20], dtype=torch.int32)
    q, k, v = (torch.randn(20, 4, 16, dtype=torch.float16, requires_grad=True) for _ in range(3))
    out = flashlab.flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
    for a, b in [(0, 3), (3, 20)]:
        check_against_reference(out[a:b][None], q[a:b][None], k[a:b][None], v[a:b][None], grads=False,
                                causal=True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_on_cpu_path_uses_the_kernels_pattern(cpu_path, causal):
    """Dropout on the CPU path: the returned pattern is the kernels' (philox.py), and output and
    gradients match the reference run with that pattern."""
    torch.manual_seed(8)
    q, k, v = make_qkv(2, 37, 50, 6, 2, 24, torch.float16, "cpu")
    out, lse, keep = flashlab.flash_attn_func(q, k, v, dropout_p=0.3, causal=causal, return_attn_probs=True)
    assert keep.shape == (2, 6, 37, 50) and 0.6 < keep.float().mean() < 0.8
    check_against_reference(out, q, k, v, causal=causal, dropout_keep=keep, dropout_p=0.3)
    torch.manual_seed(9)
    again = flashlab.flash_attn_func(q, k, v, dropout_p=0.3, causal=causal)
    assert not torch.equal(again, out)  # a new seed per call


def test_varlen_dropout_on_cpu_path(cpu_path):
    """Packed batches draw the kernels' counters: (head · total + packed position) · stride + key, the
    stride max_seqlen_k rounded up to a multiple of 32 (philox.counter_stride)."""
    torch.manual_seed(10)
    cu = torch.tensor([0, 13, 30], dtype=torch.int32)
    q, k, v = (torch.randn(30, 4, 16, dtype=torch.float16, requires_grad=True) for _ in range(3))
    torch.manual_seed(11)
    out = flashlab.flash_attn_varlen_func(q, k, v, cu, cu, 17, 17, dropout_p=0.25)
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**62, (1,)).item())  # what the call drew
    for a, b in [(0, 13), (13, 30)]:
        rows = (torch.arange(4)[:, None] * 30 + torch.arange(a, b)[None, :]) * 32  # (heads, tokens); 17 → 32
        counters = rows[..., None] + torch.arange(b - a)
        keep = philox.dropout_keep(seed, counters, 0.25)[None]
        check_against_reference(out[a:b][None], q[a:b][None], k[a:b][None], v[a:b][None], grads=False,
                                dropout_keep=keep, dropout_p=0.25)


def test_dropout_under_compile_names_itself_on_cpu_path(cpu_path):
    q, k, v = make_qkv(1, 8, 8, 2, 2, 16, torch.float16, "cpu")
    step = torch.compile(lambda q, k, v: flashlab.flash_attn_func(q, k, v, dropout_p=0.1), backend="eager",
                         fullgraph=True)
    with pytest.raises(Exception, match="dropout_p under torch.compile needs the Triton kernels"):
        step(q, k, v)


# The kernels' score options on the CPU path, forward and gradients against the fp64 reference
# (odd shapes, GQA 6:2, small tiles so that bands cross tile edges).
FEATURES = {
    "window-5-3": dict(window_size=(5, 3)),
    "window-7-causal": dict(window_size=(7, -1), causal=True),
    "window-left-only": dict(window_size=(-1, 4)),
    "softcap-causal": dict(softcap=2.5, causal=True),
    "alibi-heads-causal": dict(alibi=(6,), causal=True),
    "alibi-batch-heads": dict(alibi=(2, 6)),
    "everything": dict(window_size=(9, 2), softcap=4.0, alibi=(6,)),
}


@pytest.mark.parametrize("sq,sk", [(37, 53), (53, 37)], ids=["37x53", "53x37"])
@pytest.mark.parametrize("name", FEATURES)
def test_score_options_on_cpu_path(cpu_path, monkeypatch, name, sq, sk):
    import flashlab.blockwise as bw

    monkeypatch.setattr(bw.blockwise_attention, "__kwdefaults__", {**bw.blockwise_attention.__kwdefaults__,
                                                                    "block_size": 16})
    torch.manual_seed(3)
    kw = dict(FEATURES[name])
    if "alibi" in kw:
        kw["alibi_slopes"] = torch.rand(kw.pop("alibi"), dtype=torch.float32) * 0.5
    q, k, v = make_qkv(2, sq, sk, 6, 2, 40, torch.float16, "cpu")
    out = flashlab.flash_attn_func(q, k, v, **kw)
    check_against_reference(out, q, k, v, **kw)


@pytest.mark.parametrize("kind", ["bool-broadcast", "float-per-head"])
def test_sdpa_attn_mask_on_cpu_path(cpu_path, kind):
    torch.manual_seed(4)
    q, k, v = make_qkv(2, 29, 45, 6, 2, 24, torch.float32, "cpu", layout="bhsd")
    if kind == "bool-broadcast":
        mask = torch.rand(2, 1, 29, 45) > 0.3
        mask[..., 0] = True
    else:
        mask = torch.randn(6, 29, 45)
    out = flashlab.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    check_against_reference(out, q, k, v, layout="bhsd", causal_align="top_left", attn_mask=mask)


def test_block_mask_on_cpu_path(cpu_path):
    """A BlockMask runs on the CPU path as its dense mask (document mask with causal, GQA)."""
    torch.manual_seed(7)
    q, k, v = make_qkv(2, 45, 45, 6, 2, 24, torch.float16, "cpu")
    doc = torch.arange(45) // 15

    def pred(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & (qi >= ki)
    bm = flashlab.block_mask(pred, None, None, 45, 45, device="cpu", block_size=16)
    out = flashlab.flash_attn_func(q, k, v, block_mask=bm)
    dense = (doc[:, None] == doc[None, :]) & torch.ones(45, 45, dtype=torch.bool).tril()
    check_against_reference(out, q, k, v, attn_mask=dense)


def test_varlen_alibi_per_sequence_on_cpu_path(cpu_path):
    torch.manual_seed(5)
    cu = torch.tensor([0, 11, 30], dtype=torch.int32)
    q, k, v = (torch.randn(30, 4, 16, dtype=torch.float16, requires_grad=True) for _ in range(3))
    slopes = torch.rand(2, 4)
    out = flashlab.flash_attn_varlen_func(q, k, v, cu, cu, 19, 19, causal=True, alibi_slopes=slopes)
    for i, (a, b) in enumerate([(0, 11), (11, 30)]):
        check_against_reference(out[a:b][None], q[a:b][None], k[a:b][None], v[a:b][None], grads=False,
                                causal=True, alibi_slopes=slopes[i])


def test_mha_key_padding_mask_on_cpu_path(cpu_path):
    torch.manual_seed(6)
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True, dtype=torch.float64).eval()
    ours = flashlab.MultiheadAttention.from_torch(ref)
    x = torch.randn(3, 10, 32, dtype=torch.float64)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[1, 6:] = True
    got = ours(x, x, x, key_padding_mask=pad, need_weights=False)[0]
    want = ref(x, x, x, key_padding_mask=pad, need_weights=False)[0]
    torch.testing.assert_close(got, want)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(sq=st.integers(1, 40), sk=st.integers(1, 40), kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 3]),
       head_dim=st.sampled_from([8, 40]), causal=st.booleans(), left=st.integers(-1, 12), right=st.integers(-1, 12),
       softcap=st.sampled_from([0.0, 3.0]), alibi=st.booleans(), block=st.sampled_from([4, 16]))
def test_fuzz_blockwise_score_options(sq, sk, kv_heads, group, head_dim, causal, left, right, softcap, alibi, block):
    """blockwise_attention with any mix of the score options, tiles smaller than the shapes, against
    the fp64 reference (bottom-right alignment; rows outside every band give zeros)."""
    from flashlab.blockwise import blockwise_attention

    torch.manual_seed(sq * 41 + sk)
    heads = kv_heads * group
    q, k, v = make_qkv(2, sq, sk, heads, kv_heads, head_dim, torch.float32, "cpu")
    kw = dict(causal=causal, window_size=(left, right), softcap=softcap,
              alibi_slopes=torch.rand(heads) * 0.3 if alibi else None)
    out, _ = blockwise_attention(q, k, v, causal_offset=sk - sq, block_size=block, **kw)
    check_against_reference(out, q, k, v, **kw)


def test_works_where_triton_is_not_installed(tmp_path):
    """macOS / Windows: no Triton. Importing flashlab, the CPU path (features, backward, decoding)
    and the lab must not need it (Triton is imported only by a kernel launch)."""
    script = tmp_path / "no_triton.py"
    script.write_text(
        "import sys\n"
        "sys.modules['triton'] = None  # any import of triton now raises ImportError\n"
        "import torch, flashlab\n"
        "from flashlab.reference import naive_attention\n"
        "q, k, v = (torch.randn(2, 33, 4, 16, requires_grad=True) for _ in range(3))\n"
        "out = flashlab.flash_attn_func(q.half(), k.half(), v.half(), causal=True, window_size=(5, 0), softcap=3.0)\n"
        "out.float().sum().backward()\n"
        "sd = flashlab.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))\n"
        "want = naive_attention(q.double(), k.double(), v.double(), layout='bshd').transpose(1, 2)\n"
        "assert (sd.double() - want).abs().max() < 1e-5\n"
        "kc = torch.randn(2, 40, 4, 16)\n"
        "flashlab.flash_attn_with_kvcache(torch.randn(2, 1, 4, 16), kc, kc, cache_seqlens=torch.tensor([9, 40]))\n"
        "from flashlab.lab.cli import main\n"
        "sys.exit(main(['bench', '--seqlen', '32', '--heads', '2', '--head-dim', '8', '--batch', '1', '--providers',\n"
        "               'flashlab,naive', '--device', 'cpu', '--memory', 'off', '--cpu-repeats', '1', '--cpu-budget',\n"
        f"               '0', '--out', {str(tmp_path / 'lab')!r}]))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
