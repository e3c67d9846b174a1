"""torch.compile / torch.export / opcheck: the public functions trace without graph breaks.

On CPU the kernels run in Triton's interpreter behind opaque ops (library.py), compiled with the
``aot_eager`` backend (fake tensors, AOT autograd, functionalization — everything but Inductor's
code generation, which needs a GPU for Triton kernels). The GPU test compiles with Inductor.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from attn_checks import check_against_reference

import flashlab
from flashlab.reference import accuracy_check, naive_attention

BACKEND = "inductor" if torch.cuda.is_available() else "aot_eager"


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=BACKEND)


def _leaf(*shape: int, device: str) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float16, device=device).requires_grad_()


def _grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out, inputs, g)


def _same_as_eager(fn, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Run ``fn`` compiled (fullgraph) and eagerly; outputs and gradients must be identical."""
    out = _compiled(fn)(*inputs)
    want = fn(*inputs)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    g = torch.randn_like(out)
    for got, ref in zip(_grads(out, inputs, g), _grads(want, inputs, g)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    return out


def test_flash_attn_func_compiles_fullgraph(device):
    torch.manual_seed(0)
    q, k, v = _leaf(2, 24, 4, 16, device=device), _leaf(2, 24, 2, 16, device=device), _leaf(2, 24, 2, 16,
                                                                                             device=device)
    out = _same_as_eager(lambda q, k, v: flashlab.flash_attn_func(q, k, v, causal=True), (q, k, v))
    check_against_reference(out, q, k, v, causal=True, grads=False)


def test_sdpa_with_mask_and_permuted_inputs_compiles(device):
    torch.manual_seed(1)
    # (batch, seqlen, heads, dim) storage seen in SDPA's (batch, heads, seqlen, dim) layout: strided views.
    q, k, v = (_leaf(1, 20, 2, 16, device=device) for _ in range(3))
    mask = torch.rand(20, 20, device=device) > 0.3

    def fn(q, k, v):
        return flashlab.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     attn_mask=mask)
    _same_as_eager(fn, (q, k, v))


def test_varlen_compiles_fullgraph(device):
    torch.manual_seed(2)
    q, k, v = (_leaf(21, 2, 16, device=device) for _ in range(3))
    cu = torch.tensor([0, 5, 5, 21], dtype=torch.int32, device=device)
    _same_as_eager(lambda q, k, v: flashlab.flash_attn_varlen_func(q, k, v, cu, cu, 16, 16, causal=True), (q, k, v))


def test_dropout_compiled_draws_the_eager_masks(device):
    """Under compile the seed is drawn at run time inside an op: same masks as eager for one seed."""
    q, k, v = (_leaf(1, 16, 2, 16, device=device) for _ in range(3))
    fn = lambda q, k, v: flashlab.flash_attn_func(q, k, v, dropout_p=0.3)  # noqa: E731
    step = _compiled(fn)
    torch.manual_seed(5)
    out = step(q, k, v)
    torch.manual_seed(5)
    want = fn(q, k, v)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    g = torch.randn_like(out)
    for got, ref in zip(_grads(out, (q, k, v), g), _grads(want, (q, k, v), g)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.manual_seed(6)
    assert not torch.equal(step(q, k, v), out), "a new seed must give a new dropout mask"


# decoding.py caches the SM count with functools.cache; dynamo traces through it (a constant) and warns.
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_kvcache_compiles_fullgraph(device):
    torch.manual_seed(3)
    q = torch.randn(2, 2, 4, 16, dtype=torch.float16, device=device)
    k_cache = torch.randn(2, 40, 2, 16, dtype=torch.float16, device=device)
    v_cache = torch.randn_like(k_cache)
    k_new, v_new = (torch.randn(2, 2, 2, 16, dtype=torch.float16, device=device) for _ in range(2))
    lens = torch.tensor([3, 30], dtype=torch.int32, device=device)

    def step(q, kc, vc, kn, vn, lens):
        return flashlab.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, causal=True)
    kc1, vc1, kc2, vc2 = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
    out = _compiled(step)(q, kc1, vc1, k_new, v_new, lens)
    want = step(q, kc2, vc2, k_new, v_new, lens)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2), "the in-place append must survive compilation"


def _fwd_args(q, k, v, causal=True):
    return (q, k, v, None, None, 0, 0, 0.25, causal, True, -1, -1, 0.0, None, None, 0.0, 0)


@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_opcheck_attention_ops(device, layout):
    torch.manual_seed(4)
    if layout == "contiguous":
        q, k, v = (_leaf(1, 16, 2, 16, device=device) for _ in range(3))
    else:  # (batch, heads, seqlen, dim) storage viewed as (batch, seqlen, heads, dim)
        q, k, v = (_leaf(1, 2, 16, 16, device=device).transpose(1, 2) for _ in range(3))
    torch.library.opcheck(torch.ops.flashlab.attn_fwd.default, _fwd_args(q, k, v))
    out, lse = torch.ops.flashlab.attn_fwd(*_fwd_args(q.detach(), k.detach(), v.detach()))
    dout = torch.randn_like(out)
    bwd_args = (dout, q.detach(), k.detach(), v.detach(), out, lse, None, *_fwd_args(q, k, v)[3:])
    torch.library.opcheck(torch.ops.flashlab.attn_bwd.default, bwd_args)


def test_opcheck_kvcache_ops(device):
    torch.manual_seed(7)
    q = torch.randn(2, 1, 4, 16, dtype=torch.float16, device=device)
    k_cache = torch.randn(2, 32, 2, 16, dtype=torch.float16, device=device)
    v_cache = torch.randn_like(k_cache)
    k, v = (torch.randn(2, 1, 2, 16, dtype=torch.float16, device=device) for _ in range(2))
    lens = torch.tensor([5, 20], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.flashlab.kvcache_attn.default,
                          (q, k_cache, v_cache, lens, None, None, 0, 0.25, True, 2, 1))
    torch.library.opcheck(torch.ops.flashlab.kvcache_append.default, (k, v, k_cache, v_cache, lens, None, None))


def _run_with_grad(fn, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    out = fn(x)
    return out, _grads(out, (x,), g.to(out.dtype))[0]


def _close_to_eager(module: torch.nn.Module, call, x: torch.Tensor) -> None:
    """Inductor fuses the projections and rotary around the attention op and rounds them differently
    from eager, so there compiled and eager agree by the accuracy rule, not bit for bit: against the
    module in fp64 on the CPU path, the compiled output's error (its input gradient's) is at most 2×
    (3×) the eager fp16 error."""
    g = torch.randn(call(module, x).shape, dtype=x.dtype, device=x.device)
    out, dx = _run_with_grad(_compiled(functools.partial(call, module)), x, g)
    eager_out, eager_dx = _run_with_grad(functools.partial(call, module), x, g)
    ref = copy.deepcopy(module).to("cpu", torch.float64)
    ref_out, ref_dx = (t.to(x.device) for t in _run_with_grad(functools.partial(call, ref), x.cpu().double(),
                                                               g.cpu()))
    check = accuracy_check(out, ref_out, eager_out)
    assert check.ok, f"output: {check}"
    check = accuracy_check(dx, ref_dx, eager_dx, factor=3.0)
    assert check.ok, f"input gradient: {check}"


def test_layers_compile_fullgraph(device):
    """flashlab.MultiheadAttention (with a padding mask) and flashlab.Attention (GQA, rotary) trace whole."""
    torch.manual_seed(10)
    mha = flashlab.MultiheadAttention(32, 2, batch_first=True, dtype=torch.float16, device=device)
    layer = flashlab.Attention(32, 4, 2, rotary_base=10000.0, dtype=torch.float16, device=device)
    x = torch.randn(2, 12, 32, dtype=torch.float16, device=device, requires_grad=True)
    padding = torch.zeros(2, 12, dtype=torch.bool, device=device)
    padding[1, 9:] = True

    def with_padding(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m(x, x, x, key_padding_mask=padding.to(x.device), need_weights=False)[0]

    def plain(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m(x)

    for module, call in ((mha, with_padding), (layer, plain)):
        if BACKEND == "inductor":
            _close_to_eager(module, call, x)
        else:
            _same_as_eager(functools.partial(call, module), (x,))


class _TinyBlock(torch.nn.Module):
    def __init__(self, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim, dtype=torch.float16)
        self.out = torch.nn.Linear(dim, dim, dtype=torch.float16)
        self.attend = lambda q, k, v: flashlab.flash_attn_func(q, k, v, causal=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        return x + self.out(self.attend(q, k, v).reshape(b, s, d))


def test_export_small_model(device):
    torch.manual_seed(8)
    model = _TinyBlock().to(device)
    x = torch.randn(2, 16, 32, dtype=torch.float16, device=device)
    program = torch.export.export(model, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "flashlab.attn_fwd.default" in targets, targets
    torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_compiled_training_step_real_size():
    """Inductor, fullgraph, bf16 at a real size: a block's output and parameter gradients, compiled,
    by the accuracy rule against the block in fp64 with the reference attention (bf16 naive: baseline)."""
    torch.manual_seed(9)
    model = _TinyBlock(dim=2048, heads=16).to("cuda", torch.bfloat16)
    x = torch.randn(2, 2048, 2048, dtype=torch.bfloat16, device="cuda")
    g = torch.randn_like(x)

    def run(block: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = block(x.to(dtype))
        out.backward(g.to(dtype))
        return out, [p.grad for p in block.parameters()]

    got_out, got_grads = run(torch.compile(model, fullgraph=True), torch.bfloat16)
    results = {}
    for name, dtype in (("high", torch.float64), ("low", torch.bfloat16)):
        ref = copy.deepcopy(model).to(dtype)
        ref.zero_grad(set_to_none=True)
        ref.attend = lambda q, k, v: naive_attention(q, k, v, causal=True)
        results[name] = run(ref, dtype)
    check = accuracy_check(got_out, results["high"][0], results["low"][0])
    assert check.ok, f"output: {check}"
    for i, got in enumerate(got_grads):
        check = accuracy_check(got, results["high"][1][i], results["low"][1][i], factor=3.0)
        assert check.ok, f"parameter {i}: {check}"


def test_fake_tensors_take_the_op_and_its_shape_function(device):
    """Under FakeTensorMode (shape propagation, torch.export's tracing) the eager fast path must not
    launch: the op's fake implementation gives the output shapes, gradients included."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 24, 6, 40, dtype=torch.float16, device=device, requires_grad=True)
        k, v = (torch.empty(2, 30, 2, 40, dtype=torch.float16, device=device, requires_grad=True) for _ in range(2))
        out, lse, _ = flashlab.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert out.shape == q.shape and lse.shape == (2, 6, 24) and lse.dtype == torch.float32
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)


@pytest.mark.gpu
def test_gpu_reduce_overhead_replays_match_eager():
    """torch.compile(mode="reduce-overhead") captures the attention op in CUDA graphs (the answer to
    the host floor of tiny calls): replayed outputs and gradients equal eager ones."""
    torch.manual_seed(11)
    q, k, v = (torch.randn(1, 256, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(1, 256, 4, 64, device="cuda", dtype=torch.bfloat16)

    def step(q, k, v):
        return flashlab.flash_attn_func(q, k, v, causal=True)

    torch._dynamo.reset()
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    want = step(q, k, v)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    for _ in range(3):  # warm-up runs, then recorded graphs replay
        out = compiled(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), g)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_torch_func_transforms_get_a_clear_error(device):
    """The kernels' autograd is torch.autograd's; torch.func transforms are refused by name."""
    q, k, v = (torch.randn(1, 16, 2, 16, dtype=torch.float16, device=device) for _ in range(3))
    with pytest.raises(NotImplementedError, match="does not support torch.func transforms"):
        torch.func.grad(lambda q: flashlab.flash_attn_func(q, k, v).float().sum())(q)
