"""launch_plans.py: a replayed call launches exactly what the unplanned call would, for its own tensors.

The launches are logged by a stand-in for ``kernels/launch.launch`` (no GPU, no kernel runs), except
in the last test, which runs the kernels (interpreter, or the GPU) with and without plans."""

from __future__ import annotations

import pytest
import torch

import flashlab
from flashlab import group_split, launch_args, launch_plans, ops
from flashlab.kernels import launch as launch_module
from flashlab.kernels.configs import TileConfig


@pytest.fixture
def logged(monkeypatch):
    """Launches go to a log instead of Triton; plans start empty."""
    log: list = []
    monkeypatch.setattr(launch_module, "launch", lambda kernel, grid, *args, **named: log.append(
        (kernel, tuple(grid), args, named)))
    monkeypatch.setattr(launch_plans, "_plans", {})
    # Whole GQA groups a dK/dV program (a split group's fp32 partials are not the call's tensors).
    monkeypatch.setattr(group_split, "heads_per_split", lambda *args: args[2])
    return log


def _same_launch(a: tuple, b: tuple) -> bool:
    (ka, ga, args_a, named_a), (kb, gb, args_b, named_b) = a, b
    same_args = len(args_a) == len(args_b) and all(
        x is y if isinstance(x, torch.Tensor) else x == y and type(x) is type(y) for x, y in zip(args_a, args_b))
    return ka is kb and ga == gb and named_a == named_b and same_args


def _qkv(batch=2, sq=113, sk=203, heads=6, kv_heads=2, dim=72, transposed=False):
    if transposed:  # (batch, heads, seqlen, dim) storage seen as (batch, seqlen, heads, dim)
        make = lambda s, h: torch.randn(batch, h, s, dim, dtype=torch.float16).transpose(1, 2)  # noqa: E731
    else:
        make = lambda s, h: torch.randn(batch, s, h, dim, dtype=torch.float16)  # noqa: E731
    return make(sq, heads), make(sk, kv_heads), make(sk, kv_heads)


def _fwd(q, k, v, causal=True, window=(-1, -1), softcap=0.0, scale=0.125):
    return ops._launch_fwd(q, k, v, None, None, 0, 0, scale, causal, True, *window, softcap, None, None, 0.0, 0)


def _bwd(dout, q, k, v, out, lse, causal=True, window=(-1, -1), softcap=0.0, scale=0.125):
    return ops._launch_bwd(dout, q, k, v, out, lse, None, None, None, 0, 0, scale, causal, True, *window, softcap,
                           None, None, 0.0, 0)


def _derivation_must_not_run(*args):
    raise AssertionError("a replayed call derived its launch arguments again")


CASES = [dict(), dict(causal=False), dict(window=(17, 3)), dict(softcap=30.0), dict(causal=False, scale=0.3)]


def test_a_split_group_backward_replays_its_scratch(logged, monkeypatch):
    """A backward that splits its GQA group writes fp32 partials the call does not own (scratch):
    the plan allocates fresh ones each replay and launches what the unplanned call launches — the
    dK/dV kernel into them, then their reduction into dk, dv."""
    monkeypatch.setattr(group_split, "heads_per_split", lambda *args: 1)
    q, k, v = _qkv()
    out, lse = _fwd(q, k, v)
    _bwd(torch.randn_like(q), q, k, v, out, lse)  # records
    prepare = ops.prepare
    monkeypatch.setattr(ops, "prepare", _derivation_must_not_run)
    n = len(logged)
    dq, dk, dv = _bwd(torch.randn_like(q), q, k, v, out, lse)  # replays
    replayed = logged[n:]
    monkeypatch.setattr(ops, "prepare", prepare)
    monkeypatch.setenv("FLASHLAB_LAUNCH_PLANS", "0")
    n = len(logged)
    _bwd(torch.randn_like(q), q, k, v, out, lse)
    unplanned = logged[n:]
    assert [s[0] for s in replayed] == [s[0] for s in unplanned] and len(replayed) == 4  # + the reduction
    (_, grid, args, _), (_, _, red_args, _) = replayed[1], replayed[2]
    assert grid[2] == 2 * 3 and args[6].shape == (3, *dk.shape) and args[6].dtype == torch.float32
    assert red_args[:4] == (args[6], args[7], dk, dv)  # the fresh partials reduced into this call's dk, dv
    for (_, g1, a1, n1), (_, g2, a2, n2) in zip(replayed, unplanned):
        assert g1 == g2 and n1 == n2 and [type(x) for x in a1] == [type(x) for x in a2]
        assert [x for x in a1 if not isinstance(x, torch.Tensor)] == [x for x in a2 if not isinstance(x, torch.Tensor)]


@pytest.mark.parametrize("transposed", [False, True], ids=["bshd", "bhsd-view"])
@pytest.mark.parametrize("options", CASES, ids=["causal", "full", "window", "softcap", "scale"])
def test_replayed_forward_and_backward_launch_what_the_unplanned_call_does(logged, monkeypatch, options, transposed):
    _fwd(*_qkv(transposed=transposed), **options)  # records the plan
    q, k, v = _qkv(transposed=transposed)
    prepare = ops.prepare
    monkeypatch.setattr(ops, "prepare", _derivation_must_not_run)
    out, lse = _fwd(q, k, v, **options)  # replays it
    replayed = logged[-1]
    monkeypatch.setattr(ops, "prepare", prepare)
    monkeypatch.setenv("FLASHLAB_LAUNCH_PLANS", "0")
    ops._fwd_launches(out, lse, (q, k, v, None, None, 0, 0, options.get("scale", 0.125),
                                 options.get("causal", True), True, *options.get("window", (-1, -1)),
                                 options.get("softcap", 0.0), None, None, 0.0, 0, None, None, None),
                      launch_module.launch)
    assert _same_launch(replayed, logged[-1])

    monkeypatch.delenv("FLASHLAB_LAUNCH_PLANS")
    dout = torch.randn_like(q)
    _bwd(torch.randn_like(q), *_qkv(transposed=transposed), out, lse, **options)  # records
    n = len(logged)
    monkeypatch.setattr(ops, "prepare", _derivation_must_not_run)
    dq, dk, dv = _bwd(dout, q, k, v, out, lse, **options)  # replays
    replayed = logged[n:]
    monkeypatch.setattr(ops, "prepare", prepare)
    monkeypatch.setenv("FLASHLAB_LAUNCH_PLANS", "0")
    n = len(logged)
    dq2, dk2, dv2 = _bwd(dout, q, k, v, out, lse, **options)
    unplanned = logged[n:]
    assert len(replayed) == len(unplanned) == 3
    # Each call allocates its own gradients and delta (the preprocess kernel's 4th argument): compare
    # the unplanned launches with the replayed call's buffers swapped in.
    swap = {id(dq2): dq, id(dk2): dk, id(dv2): dv, id(unplanned[0][2][3]): replayed[0][2][3]}
    for a, b in zip(replayed, unplanned):
        assert _same_launch(a, (b[0], b[1], tuple(swap.get(id(x), x) for x in b[2]), b[3]))


def test_aliased_inputs_do_not_share_a_plan_with_distinct_ones(logged):
    q, k, _ = _qkv()
    _fwd(q, k, k)  # k passed as v: recorded with that aliasing
    q2, k2, v2 = _qkv()
    _fwd(q2, k2, v2)
    args = logged[-1][2]
    assert args[1] is k2 and args[2] is v2


def test_what_changes_the_launch_makes_a_new_plan(logged, monkeypatch):
    q, k, v = _qkv()
    _fwd(q, k, v)
    _fwd(*_qkv())
    assert len(launch_plans._plans) == 1
    _fwd(q, k[:, :200], v[:, :200])  # other seqlen_k
    _fwd(*_qkv(transposed=True))  # other strides
    _fwd(q, k, v, causal=False)
    _fwd(q.double(), k.double(), v.double())
    assert len(launch_plans._plans) == 5
    # a monkeypatched config function (kernel_check.py's tuning) is part of the signature
    monkeypatch.setattr(ops, "forward_config", lambda *a: TileConfig(16, 16, 4, 1))
    _fwd(q, k, v)
    assert len(launch_plans._plans) == 6 and logged[-1][3]["BLOCK_M"] == 16


def test_dropout_and_varlen_calls_are_never_planned(logged):
    """A dropout seed changes every call; varlen's 3-D tensors are viewed as 4-D per launch."""
    q, k, v = _qkv()
    ops._launch_fwd(q, k, v, None, None, 0, 0, 0.125, True, True, -1, -1, 0.0, None, None, 0.1, 1234)
    cu = torch.tensor([0, 113, 226], dtype=torch.int32)
    ops._launch_fwd(q.flatten(0, 1), k[:, :113].flatten(0, 1), v[:, :113].flatten(0, 1), cu, cu, 113, 113, 0.125,
                    True, True, -1, -1, 0.0, None, None, 0.0, 0)
    assert launch_plans._plans == {}


def _optional_tensors(kind: str, q: torch.Tensor, k: torch.Tensor) -> tuple:
    """(alibi_slopes, attn_mask, block_tiles, block_kv, block_q) for one kind of optional input."""
    batch, sq, heads = q.shape[:3]
    sk = k.shape[1]
    if kind == "alibi":
        return torch.rand(batch, heads), None, None, None, None
    if kind == "bool-mask":
        return None, torch.rand(batch, 1, sq, sk) > 0.3, None, None, None
    mask = flashlab.block_mask(lambda b, h, qi, kj: (qi // 50) == (kj // 70), None, None, sq, sk, block_size=32)
    return None, None, mask.tiles, mask.kv_table, mask.q_table


@pytest.mark.parametrize("kind", ["alibi", "bool-mask", "block-mask"])
def test_optional_tensors_take_slots_in_the_plan(logged, monkeypatch, kind):
    """ALiBi slopes, masks and block-mask tables are tensors of the call: replays pass the new ones."""
    def fwd(q, k, v, optional):
        slopes, mask, tiles, kv_table, q_table = optional
        return ops._launch_fwd(q, k, v, None, None, 0, 0, 0.125, False, True, -1, -1, 0.0, slopes, mask, 0.0, 0,
                               tiles, kv_table, q_table)

    q, k, v = _qkv()
    fwd(q, k, v, _optional_tensors(kind, q, k))  # records
    q, k, v = _qkv()
    optional = _optional_tensors(kind, q, k)
    monkeypatch.setattr(ops, "prepare", _derivation_must_not_run)
    out, lse = fwd(q, k, v, optional)  # replays
    replayed = logged[-1]
    monkeypatch.setattr(ops, "prepare", launch_args.prepare)
    monkeypatch.setenv("FLASHLAB_LAUNCH_PLANS", "0")
    ops._fwd_launches(out, lse, (q, k, v, None, None, 0, 0, 0.125, False, True, -1, -1, 0.0, *optional[:2], 0.0, 0,
                                 *optional[2:]), launch_module.launch)
    assert _same_launch(replayed, logged[-1])
    assert len(launch_plans._plans) == 1


def test_direct_replays_reuse_the_compiled_kernel_per_pointer_alignment(monkeypatch):
    """On a GPU a replay calls the compiled kernel launch() returned, once per alignment pattern."""
    monkeypatch.setattr(launch_plans, "_plans", {})
    monkeypatch.setattr(launch_plans, "_direct", lambda device: True)
    calls = []
    monkeypatch.setattr(launch_module, "launch", lambda kernel, grid, *args, **named: calls.append("launch") or (
        "compiled", ()))
    monkeypatch.setattr(launch_module, "run_compiled", lambda runner, grid, args: calls.append("direct"))
    x = torch.zeros(64)

    def launcher(launch_fn):
        launch_fn("kernel", (1,), x_now[0], 3, BLOCK=16)

    for x_now in ([x], [torch.zeros(64)], [torch.zeros(64)], [x[1:]]):
        launch_plans.run(("sig",), (x_now[0],), launcher)
    # record (launch), first replay (launch, runner kept), replay (direct), misaligned pointer (launch)
    assert calls == ["launch", "launch", "direct", "launch"]


def test_plans_give_the_unplanned_results(monkeypatch, device):
    """The kernels run: outputs and gradients with plans equal those without, bit for bit."""
    monkeypatch.setattr(launch_plans, "_plans", {})
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 37, h, 40, dtype=torch.float16, device=device, requires_grad=True)
               for h in (4, 2, 2))
    g = torch.randn(1, 37, 4, 40, dtype=torch.float16, device=device)
    results = []
    # unplanned, recording, replaying (on a GPU: through launch(), then the compiled kernel directly)
    for plans in ("0", "1", "1", "1"):
        monkeypatch.setenv("FLASHLAB_LAUNCH_PLANS", plans)
        out = flashlab.flash_attn_func(q, k, v, causal=True, window_size=(9, -1))
        results.append((out, *torch.autograd.grad(out, (q, k, v), g)))
    for got in results[1:]:
        for a, b in zip(got, results[0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_decoding_replays_give_the_unplanned_results(monkeypatch, device, paged):
    """flash_attn_with_kvcache (append + split-KV attention + combine) with plans equals it without."""
    monkeypatch.setattr(launch_plans, "_plans", {})
    torch.manual_seed(0)
    batch, cache_len, heads, kv_heads, dim = 2, 96, 6, 2, 40
    q = torch.randn(batch, 3, heads, dim, dtype=torch.float16, device=device)
    k_new, v_new = (torch.randn(batch, 3, kv_heads, dim, dtype=torch.float16, device=device) for _ in range(2))
    lens = torch.tensor([17, 60], dtype=torch.int32, device=device)
    if paged:
        k_cache, v_cache = (torch.randn(12, 16, kv_heads, dim, dtype=torch.float16, device=device) for _ in range(2))
        table = torch.randperm(12, device=device).to(torch.int32).view(batch, 6)
    else:
        k_cache, v_cache = (torch.randn(batch, cache_len, kv_heads, dim, dtype=torch.float16, device=device)
                            for _ in range(2))
        table = None
    results = []
    for plans in ("0", "1", "1", "1"):
        monkeypatch.setenv("FLASHLAB_LAUNCH_PLANS", plans)
        kc, vc = k_cache.clone(), v_cache.clone()
        out, lse = flashlab.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=lens, block_table=table,
                                                    causal=True, num_splits=3, return_softmax_lse=True)
        results.append((out, lse, kc, vc))
    assert len(launch_plans._plans) == 2  # the append and the attention
    for got in results[1:]:
        for a, b in zip(got, results[0]):
            assert torch.equal(a, b)


def test_a_launcher_that_bypasses_the_launch_function_is_never_replayed(logged):
    """The Gluon kernels launch outside the launch function (launch_plans.UNPLANNED): every call with
    that signature runs its launcher again — a replay would launch nothing."""
    q, k, v = _qkv()
    runs = []

    def launcher(launch_fn):
        runs.append(launch_fn)
        return launch_plans.UNPLANNED

    for _ in range(3):
        launch_plans.run(("sig",), (q, k, v), launcher)
    assert len(runs) == 3 and logged == []


def test_the_kernel_switches_are_part_of_the_signature(logged, monkeypatch):
    """A plan recorded with FLASHLAB_FWD_GLUON=0 must not serve a call with the switch on (it would
    replay the `tl` kernel where the Gluon one was asked for) — and the other way round; the same
    for FLASHLAB_FWD_TMA."""
    q, k, v = _qkv()
    monkeypatch.setenv("FLASHLAB_FWD_GLUON", "0")
    _fwd(q, k, v)
    monkeypatch.delenv("FLASHLAB_FWD_GLUON")
    _fwd(q, k, v)
    assert len(launch_plans._plans) == 2
    monkeypatch.setenv("FLASHLAB_FWD_TMA", "1")  # the opt-in TMA forward: its own signature too
    _fwd(q, k, v)
    assert len(launch_plans._plans) == 3


def test_decoding_pdl_switch(logged, monkeypatch):
    """FLASHLAB_DECODE_PDL=1 (Hopper only) launches the combine kernel as a programmatic dependent
    of the split kernel (both compiled with PDL); the switch is part of the plan's signature."""
    from flashlab import decoding

    real = decoding.pdl_enabled
    assert not real(torch.device("cpu"))
    monkeypatch.setenv("FLASHLAB_DECODE_PDL", "1")
    assert not real(torch.device("cpu"))  # a Hopper GPU only
    q = torch.randn(1, 1, 8, 64, dtype=torch.float16)
    kc = torch.randn(1, 512, 2, 64, dtype=torch.float16)
    lens = torch.tensor([300], dtype=torch.int32)
    for on in (False, True):
        monkeypatch.setattr(decoding, "pdl_enabled", lambda device, on=on: on)
        n = len(logged)
        flashlab.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=lens, num_splits=4)
        (_, _, _, attn), (_, _, _, combine) = logged[n:]
        assert attn["PDL"] is on and combine["PDL"] is on and combine.get("launch_pdl", False) is on
