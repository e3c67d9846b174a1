"""group_split.py: a GQA group's query heads split over several dK/dV programs when the grid is too
small — the rule, the `tl` backward with split groups against the reference (interpreter or GPU),
the Gluon launchers' split arguments and reduction (CPU, stand-in kernels), and on a Hopper GPU the
Gluon kernels' split gradients."""

from __future__ import annotations

import pytest
import torch
from attn_checks import FakeKernel, backward_launch_inputs, check_against_reference, gluon_spy, make_qkv

import flashlab
from flashlab import group_split, ops
from flashlab.gluon_backward import launch_bwd_gluon, launch_bwd_gluon_fused
from flashlab.reference import accuracy_check, naive_attention, reference_attention

F16, BF16 = torch.float16, torch.bfloat16
H200_SMS = 132


def per_split(batch, kv_heads, group, seqlen, causal, block_m=64, block_n=128, sms=H200_SMS, ctas=1):
    return group_split.heads_per_split(batch, kv_heads, group, seqlen, seqlen, block_m, block_n,
                                       0 if causal else None, sms, ctas)


def test_the_rule_splits_small_grids_only():
    assert per_split(1, 1, 32, 4096, False) == 8  # MQA at 4k: 32 equal programs -> 128, one wave
    assert per_split(1, 1, 32, 4096, False, block_m=32, ctas=2) == 4  # two a SM: 256 slots
    assert per_split(1, 1, 32, 16384, True) == 16  # causal: 128 programs, the longest sets the pace
    assert per_split(1, 8, 4, 4096, False) == 4  # 32:8 at 4k: 256 equal programs, two whole waves
    assert per_split(1, 8, 4, 4096, True) == 1  # causal: 4 splits of one head even out the tail
    assert per_split(1, 16, 4, 16384, True) == 4  # 2048 programs: 15 waves, no split
    assert per_split(2, 16, 1, 8192, True) == 1  # no group
    assert per_split(1, 2, 3, 300, True, sms=8) == 2  # the interpreter's pretend GPU: 6 programs -> 12
    for group in range(1, 40):  # never past MAX_SPLITS
        per = per_split(1, 1, group, 2048, True)
        assert 1 <= per <= group and -(-group // per) <= group_split.MAX_SPLITS


def test_the_switch_keeps_whole_groups(monkeypatch):
    dk = torch.empty(1, 300, 1, 64)
    split = group_split.targets(dk, dk, 1, 1, 8, 300, 300, 64, 128, 0)  # 3 programs on 8 pretend SMs
    assert split.splits > 1 and split.dk.shape == (split.splits, *dk.shape) and split.dk.dtype == torch.float32
    monkeypatch.setenv("FLASHLAB_BWD_GROUP_SPLIT", "0")
    whole = group_split.targets(dk, dk, 1, 1, 8, 300, 300, 64, 128, 0)
    assert whole.splits == 1 and whole.heads_per_split == 8 and whole.dk is dk and whole.stride_split == 0


def test_makespan_schedules_in_launch_order():
    # Two slots, programs of 3, 1, 1 tiles in one split: 3 | 1 + 1 -> 3.
    assert group_split.makespan([3, 1, 1], 1, 1, 1, 2) == 3
    # Two splits of a group of 3 (2 heads, then 1) over two blocks of 1 tile: 2, 2 | 1, 1 -> 3.
    assert group_split.makespan([1, 1], 1, 3, 2, 2) == 3


def test_query_tiles_per_key_block():
    assert group_split.query_tiles_per_key_block(300, 300, 64, 128, None) == [5, 5, 5]
    assert group_split.query_tiles_per_key_block(300, 300, 64, 128, 0) == [5, 3, 1]
    # Bottom-right with a key prefix: query i sees keys up to i + 200.
    assert group_split.query_tiles_per_key_block(100, 300, 64, 128, 200) == [2, 2, 2]  # key 256: query 56 on
    assert group_split.query_tiles_per_key_block(100, 400, 64, 128, 300) == [2, 2, 2, 1]  # key 384: query 84


@pytest.fixture
def forced_split(monkeypatch):
    """forced_split(per): every dK/dV launch sums ``per`` query heads a program (fewer where the group
    is smaller); returns the list of group_split.DkDvTargets the launches got."""
    seen = []
    real = group_split.targets

    def force(per):
        monkeypatch.setattr(group_split, "heads_per_split", lambda *args: min(per, args[2]))
        monkeypatch.setattr(group_split, "targets", lambda *args: seen.append(real(*args)) or seen[-1])
        return seen
    return force


@pytest.mark.parametrize("heads, kv_heads, per, causal", [
    (4, 1, 1, True),    # MQA, every head its own split
    (6, 2, 2, False),   # GQA 6:2, groups of 3 cut 2 + 1
    (8, 2, 3, True),    # groups of 4 cut 3 + 1
])
def test_split_groups_match_the_reference(device, forced_split, heads, kv_heads, per, causal):
    seen = forced_split(per)
    torch.manual_seed(3)
    q, k, v = make_qkv(2, 37, 53, heads, kv_heads, 40, F16, device)
    out = flashlab.flash_attn_func(q, k, v, causal=causal)
    check_against_reference(out, q, k, v, causal=causal)
    assert seen and all(s.splits == -(-(heads // kv_heads) // per) > 1 for s in seen)


def test_split_varlen_matches_the_reference(device, forced_split):
    """Packed sequences (one of length 1) with every head its own split: each sequence's gradients
    pass the accuracy rule against the reference run on that sequence alone."""
    seen = forced_split(1)
    torch.manual_seed(4)
    lens = [17, 1, 40]
    cu = torch.tensor([0, 17, 18, 58], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(58, h, 32, dtype=F16, device=device, requires_grad=True) for h in (4, 2, 2))
    out = flashlab.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    assert seen and seen[0].splits == 2
    for start, n in zip(cu.tolist(), lens):
        rows = slice(start, start + n)
        one = [t.detach()[rows][None].clone().requires_grad_() for t in (q, k, v)]
        ref = reference_attention(*one, dtype=torch.float64, causal=True)
        low = naive_attention(*one, causal=True)
        want = torch.autograd.grad(ref, one, g[rows][None].double())
        same = torch.autograd.grad(low, one, g[rows][None])
        for name, a, r, s in zip(("dq", "dk", "dv"), got, want, same):
            check = accuracy_check(a[rows][None], r, s, factor=3.0)
            assert check.ok, f"{name}, sequence of {n}: {check}"


def test_split_gradients_are_deterministic(device, forced_split):
    forced_split(1)
    torch.manual_seed(5)
    q, k, v = make_qkv(1, 29, 29, 4, 1, 32, F16, device)
    runs = []
    for _ in range(2):
        q.grad = k.grad = v.grad = None
        flashlab.flash_attn_func(q, k, v, causal=True).sum().backward()
        runs.append([t.grad.clone() for t in (q, k, v)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


class PartialWriter(FakeKernel):
    """A stand-in dK/dV kernel: writes (split + 1) · pattern into every split's partial dK and
    (split + 1) · 2 · pattern into its dV (the (splits, *dk.shape) tensors the launch gets)."""

    def __init__(self, dk_arg: int, stride_arg: int):
        super().__init__()
        self.dk_arg, self.stride_arg = dk_arg, stride_arg

    def __getitem__(self, grid):
        record = super().__getitem__(grid)

        def run(*args, **kwargs):
            record(*args, **kwargs)
            for partials, scale in ((args[self.dk_arg], 1.0), (args[self.dk_arg + 1], 2.0)):
                for s in range(partials.shape[0]):
                    partials[s] = scale * (s + 1) * torch.arange(partials[s].numel()).view(partials[s].shape) / 64
        return run


@pytest.mark.parametrize("fused", [False, True], ids=["two-kernel", "fused"])
def test_gluon_launchers_split_and_reduce(monkeypatch, fused):
    import flashlab.kernels.backward_gluon as kernels
    import flashlab.kernels.backward_gluon_fused as fused_kernels

    # 300 keys in 3 blocks of 128, 2 kv heads: 6 programs on the pretend 8-SM GPU -> splits of 2 + 1 heads.
    b, s, h, hk, d = 1, 300, 6, 2, 128
    q, k, v, do, dq, dk, dv, lse, delta = backward_launch_inputs("bshd", b, s, h, hk, d, F16)
    if fused:
        fake = PartialWriter(6, 30)
        monkeypatch.setattr(fused_kernels, "attn_bwd_fused_gluon_kernel", fake)
        launch_bwd_gluon_fused(q, k, v, do, dq, dk, dv, lse, delta, (h * s, s), 0.1, True)
    else:
        fake = PartialWriter(6, 26)
        monkeypatch.setattr(kernels, "attn_bwd_dkdv_gluon_kernel", fake)
        monkeypatch.setattr(kernels, "attn_bwd_dq_gluon_kernel", FakeKernel())
        launch_bwd_gluon(q, k, v, do, dq, dk, dv, lse, delta, (h * s, s), 0.1, True)
    (grid, args, kw), = fake.launches
    assert grid == (3, hk, b * 2) and kw["SPLIT"] is True
    partials = args[6]
    assert partials.dtype == torch.float32 and partials.shape == (2, *dk.shape) and args[fake.stride_arg] == dk.numel()
    assert args[fake.stride_arg - 1] == 2  # heads a split
    pattern = torch.arange(dk.numel()).view(dk.shape).float() / 64
    assert torch.equal(dk, (3 * pattern).to(F16)) and torch.equal(dv, (6 * pattern).to(F16))  # 1 + 2 splits


@pytest.mark.gpu
@pytest.mark.parametrize("sq, heads, kv_heads, causal, fused", [
    (1100, 8, 1, False, False),  # MQA: 9 programs -> split
    (1030, 6, 2, True, False),   # GQA 6:2, ragged
    (1100, 8, 1, True, True),    # the fused kernel (any length here), MQA
    (1030, 6, 2, True, True),
])
def test_gluon_split_gradients_match_the_reference(monkeypatch, sq, heads, kv_heads, causal, fused):
    import flashlab.gluon_backward as host

    two = gluon_spy(monkeypatch, "FLASHLAB_BWD_GLUON", ops, "launch_bwd_gluon")
    spy = gluon_spy(monkeypatch, "FLASHLAB_BWD_FUSED", ops, "launch_bwd_gluon_fused")
    monkeypatch.setattr(host, "FUSED_MIN_SEQLEN", 0 if fused else 1 << 30)
    monkeypatch.setattr(host, "FUSED_MAX_GROUP", 64)
    seen = []
    real = group_split.targets
    monkeypatch.setattr(group_split, "targets", lambda *a: seen.append(real(*a)) or seen[-1])
    torch.manual_seed(8)
    q, k, v = make_qkv(1, sq, sq, heads, kv_heads, 128, BF16, "cuda")
    out = flashlab.flash_attn_func(q, k, v, causal=causal)
    check_against_reference(out, q, k, v, causal=causal)
    assert len(spy if fused else two) == 1 and seen[-1].splits > 1
