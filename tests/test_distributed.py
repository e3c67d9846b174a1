"""Ring attention (flashlab.distributed): real runs (the schedule and sharding helpers are checked
without processes in test_distributed_schedule.py).

CPU tier: 2 and 4 gloo processes (torch.multiprocessing, forkserver with torch and flashlab
preloaded so each start costs milliseconds) run every case once per world size; rank 0 saves the
gathered output, LSE and gradients, and the tests here check them against single-process attention
on the full sequence with the ANCHORS.md accuracy rule. Most cases run the blockwise path
(TRITON_INTERPRET=0 in the workers); the ``kernels`` ones run the Triton kernels in the interpreter.
GPU tier: world size 1 over NCCL equals flash_attn_func bit for bit.
"""

from __future__ import annotations

import multiprocessing
import os
import zlib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

import flashlab
from flashlab import distributed as fd
from flashlab.kernels.configs import interpreting
from flashlab.reference import accuracy_check, naive_attention

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One ring-attention run: global shapes (varlen: one length per sequence) and options."""

    world: int
    causal: bool
    sharding: str = "contiguous"
    method: str = "ring"
    dtype: str = "bf16"
    kernels: bool = False  # Triton interpreter instead of the blockwise path
    seqlens_q: tuple[int, ...] = (13,)
    seqlens_k: tuple[int, ...] | None = None  # None: same as q (needed for causal)
    varlen: bool = False
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    lse_grad: bool = False  # the loss also uses the LSE (exercises dlse)

    @property
    def id(self) -> str:
        lens = "+".join(map(str, self.seqlens_q)) + ("x" + "+".join(map(str, self.seqlens_k)) if self.seqlens_k else "")
        kind = ("causal-" + self.sharding) if self.causal else "full"
        extra = ("-varlen" if self.varlen else "") + ("-kernels" if self.kernels else "") + (
            "-dlse" if self.lse_grad else "")
        return f"W{self.world}-S{lens}-H{self.heads}:{self.kv_heads}-{kind}-{self.method}-{self.dtype}{extra}"

    def inputs(self) -> tuple[torch.Tensor, ...]:
        """Global q, k, v, dout, dlse (deterministic per case); varlen tensors are packed."""
        gen = torch.Generator().manual_seed(zlib.crc32(self.id.encode()))
        lk = self.seqlens_k or self.seqlens_q
        batch = 1 if self.varlen else 2
        def randn(*shape):
            t = torch.randn(batch, *shape, generator=gen).to(DTYPES[self.dtype])
            return t.flatten(0, 1) if self.varlen else t
        sq, sk = sum(self.seqlens_q), sum(lk)
        q, k, v = randn(sq, self.heads, self.head_dim), randn(sk, self.kv_heads, self.head_dim), randn(
            sk, self.kv_heads, self.head_dim)
        dout = randn(sq, self.heads, self.head_dim)
        dlse = torch.randn((self.heads, sq) if self.varlen else (batch, self.heads, sq), generator=gen)
        return q, k, v, dout, dlse

    def cu(self, lengths: tuple[int, ...] | None) -> torch.Tensor:
        lengths = lengths or self.seqlens_q
        return torch.tensor([sum(lengths[:i]) for i in range(len(lengths) + 1)], dtype=torch.int32)


CASES_2 = [
    Case(2, False),
    Case(2, False, "zigzag", "allgather", "fp32", seqlens_q=(11,), seqlens_k=(14,), kv_heads=1),
    Case(2, True),
    Case(2, True, "contiguous", "allgather", "fp16", lse_grad=True),
    Case(2, True, "zigzag", seqlens_q=(14,)),
    Case(2, True, "zigzag", "allgather", "fp32", seqlens_q=(10,)),
    Case(2, True, "zigzag", "ring", "bf16", seqlens_q=(5, 13, 1), varlen=True, lse_grad=True),
    Case(2, False, "contiguous", "allgather", "fp32", seqlens_q=(3, 8), seqlens_k=(6, 5), varlen=True),
    Case(2, True, "zigzag", "ring", "fp16", kernels=True, seqlens_q=(14,), lse_grad=True),
    Case(2, True, "zigzag", "ring", "fp16", kernels=True, seqlens_q=(5, 13, 1), varlen=True),
    Case(2, False, "contiguous", "allgather", "fp16", kernels=True, seqlens_q=(9,), seqlens_k=(12,)),
]
CASES_4 = [
    Case(4, True, "zigzag", seqlens_q=(21,)),
    Case(4, True, "contiguous", "allgather", "fp32", seqlens_q=(18,)),
    Case(4, True, "contiguous", "ring", "fp16", seqlens_q=(19,), lse_grad=True),
    Case(4, False, "zigzag", "ring", "fp32", seqlens_q=(15,), seqlens_k=(9,), heads=3, kv_heads=1),
    Case(4, True, "zigzag", "ring", "bf16", seqlens_q=(9, 20, 3), varlen=True),
    Case(4, True, "zigzag", "allgather", "fp16", kernels=True, seqlens_q=(17,)),
]


def _reference(case: Case, q, k, v, dtype: torch.dtype | None):
    """(out, lse) of single-process attention on the global tensors (upcast to ``dtype`` if given)."""
    up = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    if not case.varlen:
        return naive_attention(up(q), up(k), up(v), causal=case.causal, return_lse=True)
    cq, ck = case.cu(case.seqlens_q).tolist(), case.cu(case.seqlens_k).tolist()
    outs, lses = [], []
    for (a, b), (c, d) in zip(zip(cq, cq[1:]), zip(ck, ck[1:])):
        o, lse = naive_attention(up(q[a:b])[None], up(k[c:d])[None], up(v[c:d])[None], causal=case.causal,
                                 return_lse=True)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def _run_case(case: Case, rank: int) -> dict[str, torch.Tensor]:
    """This rank's part of a case; returns the gathered global results (all ranks hold them)."""
    w, sh = case.world, case.sharding
    q, k, v, dout, dlse = case.inputs()
    if case.varlen:
        cu_q, cu_k = case.cu(case.seqlens_q), case.cu(case.seqlens_k)
        (ql, cql), (kl, ckl), (vl, _) = (fd.shard_varlen(t, cu, w, rank, sharding=sh)
                                         for t, cu in ((q, cu_q), (k, cu_k), (v, cu_k)))
        dl, dlse_l = fd.shard_varlen(dout, cu_q, w, rank, sharding=sh)[0], fd.shard_varlen(
            dlse.t(), cu_q, w, rank, sharding=sh)[0].t()
    else:
        ql, kl, vl, dl = (fd.shard_sequence(t, w, rank, sharding=sh) for t in (q, k, v, dout))
        dlse_l = fd.shard_sequence(dlse, w, rank, sharding=sh, dim=2)
    ql, kl, vl = (t.clone().requires_grad_() for t in (ql, kl, vl))
    opts = dict(causal=case.causal, method=case.method, sharding=sh, return_attn_probs=True)
    if case.varlen:
        out, lse, _ = fd.ring_flash_attn_varlen_func(ql, kl, vl, cql, ckl, **opts)
    else:
        out, lse, _ = fd.ring_flash_attn_func(ql, kl, vl, **opts)
    loss = (out.float() * dl.float()).sum() + ((lse * dlse_l).sum() if case.lse_grad else 0.0)
    grads = torch.autograd.grad(loss, (ql, kl, vl))
    if case.varlen:
        gather = lambda t, cu: fd.gather_varlen(t, cu, sharding=sh)
        res = {"out": gather(out, cu_q), "lse": gather(lse.t(), cu_q).t()}
        res.update({n: gather(g, cu) for n, g, cu in zip(("dq", "dk", "dv"), grads, (cu_q, cu_k, cu_k))})
    else:
        res = {"out": fd.gather_sequence(out, sharding=sh), "lse": fd.gather_sequence(lse, sharding=sh, dim=2)}
        res.update({n: fd.gather_sequence(g, sharding=sh) for n, g in zip(("dq", "dk", "dv"), grads)})
    return res


# Error cases: each rank makes its own (possibly bad) call; every rank must raise, none may hang.
def _err_call(name: str, rank: int) -> None:
    x = lambda s, h=4: torch.randn(1, s, h, 8)
    cu = lambda *lens: torch.tensor([sum(lens[:i]) for i in range(len(lens) + 1)], dtype=torch.int32)
    if name == "method-on-one-rank":
        fd.ring_flash_attn_func(x(4), x(4, 2), x(4, 2), method="rnig" if rank == 1 else "ring")
    elif name == "ndim-on-one-rank":
        fd.ring_flash_attn_func(x(4)[0] if rank == 0 else x(4), x(4, 2), x(4, 2))
    elif name == "heads-disagree":
        fd.ring_flash_attn_func(x(4, 4 if rank == 0 else 2), x(4, 2), x(4, 2))
    elif name == "scale-disagree":
        fd.ring_flash_attn_func(x(4), x(4, 2), x(4, 2), softmax_scale=0.5 if rank == 0 else 0.25)
    elif name == "zigzag-lengths":
        s = 6 if rank == 0 else 3
        fd.ring_flash_attn_func(x(s), x(s, 2), x(s, 2), causal=True, sharding="zigzag")
    elif name == "causal-q-k-lengths":
        fd.ring_flash_attn_func(x(5), x(5 + (rank == 0), 2), x(5 + (rank == 0), 2), causal=True)
    elif name == "varlen-batch-disagree":
        lens = (2, 3, 1) if rank == 0 else (4, 2)
        t = torch.randn(sum(lens), 4, 8)
        fd.ring_flash_attn_varlen_func(t, t, t, cu(*lens), cu(*lens))


# (rank 0 expects, rank 1 expects): (exception type, substring of the message)
ERRORS = {
    "method-on-one-rank": (("ValueError", "rank(s) [1]"), ("ValueError", "method must be one of")),
    "ndim-on-one-rank": (("ValueError", "must be 4-D"), ("ValueError", "rank(s) [0]")),
    "heads-disagree": (("ValueError", "disagree on heads"),) * 2,
    "scale-disagree": (("ValueError", "disagree on softmax_scale"),) * 2,
    "zigzag-lengths": (("ValueError", "do not match a zigzag sharding"),) * 2,
    "causal-q-k-lengths": (("ValueError", "same tokens"),) * 2,
    "varlen-batch-disagree": (("ValueError", "disagree on nseq"),) * 2,
}


def _worker(rank: int, world: int, init_file: str, cases: list, outdir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        for case in cases:
            os.environ["TRITON_INTERPRET"] = "1" if getattr(case, "kernels", False) else "0"
            if case == "bench":  # the lab's measurement on this group, tiny
                from flashlab.distributed import bench

                args = bench.parse_args(["--seqlen", "24", "--heads", "2", "--head-dim", "8", "--causal",
                                         "--reps", "2", "--warmup", "1"], cuda=False)
                rows = bench.gather_rows(bench.measure(args, torch.device("cpu")))
                torch.save((rows, bench.summarize(rows, world)), Path(outdir) / "bench.pt")
                continue
            if case == "check":  # the real-size correctness check of issue 10, at a tiny size
                from flashlab.distributed import check

                args = check.parse_args(["--seqlen", "45", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                                         "--dtype", "fp16"], cuda=False)
                rows = check.check_all(args, torch.device("cpu"), verbose=False)
                if rank == 0:
                    torch.save(rows, Path(outdir) / "check.pt")
                continue
            if isinstance(case, str):  # an error case
                try:
                    _err_call(case, rank)
                    result: object = ("no error", "")
                except Exception as e:  # noqa: BLE001 - recorded for the test to judge
                    result = (type(e).__name__, str(e))
                torch.save(result, Path(outdir) / f"{case}-rank{rank}.pt")
                continue
            try:
                result = _run_case(case, rank)
            except Exception as e:  # noqa: BLE001 - reported by the case's test
                result = {"error": f"{type(e).__name__}: {e}"}
            if rank == 0:
                torch.save(result, Path(outdir) / f"{case.id}.pt")
    finally:
        dist.destroy_process_group()


def _launch(world: int, cases: list, tmp_path: Path) -> Path:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "flashlab.distributed", "flashlab.ops", __name__])
    tmp.start_processes(_worker, args=(world, str(tmp_path / "store"), cases, str(tmp_path)), nprocs=world,
                        start_method="forkserver")
    return tmp_path


def _runnable(cases: list[Case]) -> list[Case]:
    # Interpreter cases need the kernels compiled for the interpreter (the CPU machines' default).
    return [c for c in cases if not c.kernels or interpreting()]


@pytest.fixture(scope="module")
def results2(tmp_path_factory) -> Path:
    return _launch(2, list(ERRORS) + _runnable(CASES_2) + ["bench", "check"], tmp_path_factory.mktemp("ring2"))


@pytest.fixture(scope="module")
def results4(tmp_path_factory) -> Path:
    return _launch(4, _runnable(CASES_4), tmp_path_factory.mktemp("ring4"))


def _check_result(case: Case, outdir: Path) -> None:
    if case.kernels and not interpreting():
        pytest.skip("kernel cases run in the Triton interpreter (TRITON_INTERPRET=1)")
    res = torch.load(outdir / f"{case.id}.pt")
    assert "error" not in res, res.get("error")
    q, k, v, dout, dlse = (t.requires_grad_() if i < 3 else t for i, t in enumerate(case.inputs()))
    (ref, ref_lse), (low, low_lse) = _reference(case, q, k, v, torch.float64), _reference(case, q, k, v, None)
    for name, got, hi, lo in (("out", res["out"], ref, low), ("lse", res["lse"], ref_lse, low_lse)):
        check = accuracy_check(got, hi, lo)
        assert got.shape == hi.shape and check.ok, f"{name}: {check}"
    def loss(o, lse):
        return (o * dout.to(o.dtype)).sum() + ((lse * dlse.to(lse.dtype)).sum() if case.lse_grad else 0.0)
    want = torch.autograd.grad(loss(ref, ref_lse), (q, k, v))
    same = torch.autograd.grad(loss(low.float(), low_lse), (q, k, v))
    for name, w, s in zip(("dq", "dk", "dv"), want, same):
        got = res[name]
        assert got.dtype == q.dtype and got.shape == w.shape
        check = accuracy_check(got, w, s, factor=3.0)
        assert check.ok, f"{name}: {check}"


@pytest.mark.parametrize("case", CASES_2, ids=lambda c: c.id)
def test_two_ranks_match_single_process(case: Case, results2: Path) -> None:
    _check_result(case, results2)


@pytest.mark.parametrize("case", CASES_4, ids=lambda c: c.id)
def test_four_ranks_match_single_process(case: Case, results4: Path) -> None:
    _check_result(case, results4)


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_input_raises_on_every_rank(name: str, results2: Path) -> None:
    for rank, (etype, fragment) in enumerate(ERRORS[name]):
        got_type, message = torch.load(results2 / f"{name}-rank{rank}.pt")
        assert got_type == etype and fragment in message, f"rank {rank}: {got_type}: {message}"


def test_bench_reports_per_rank_and_scaling(results2: Path) -> None:
    rows, summary = torch.load(results2 / "bench.pt")
    assert sorted((r["method"], r["mode"], r["rank"]) for r in rows) == sorted(
        (m, mode, rank) for m in ("ring", "allgather") for mode in ("fwd", "fwd+bwd") for rank in (0, 1))
    for r in rows:
        assert r["time_ms"] > 0 and r["compute_ms"] > 0 and r["comm_ms"] > 0 and r["tflops_per_gpu"] > 0
        assert r["exposed_ms"] == max(0.0, r["time_ms"] - r["compute_ms"]) and 0 <= r["hidden_share"] <= 1
    for s in summary:
        step = max(r["time_ms"] for r in rows if (r["method"], r["mode"]) == (s["method"], s["mode"]))
        assert s["step_ms"] == step and s["efficiency"] == pytest.approx(s["baseline_ms"] / (2 * step))


def test_real_size_check_runs_every_case(results2: Path) -> None:
    """flashlab.distributed.check (what multi_gpu_round.sh runs on GPUs): 8 cases, all within the rule."""
    rows = torch.load(results2 / "check.pt")
    assert sorted((r["method"], r["sharding"], r["causal"]) for r in rows) == sorted(
        (m, s, c) for m in ("ring", "allgather") for s in ("contiguous", "zigzag") for c in (False, True))
    assert all(r["ok"] for r in rows), rows


# ------------------------------------------------------------------ world size 1, in process
@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    """A one-process gloo world (and an NCCL group on it when there is a GPU)."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg1') / 'store'}", rank=0,
                            world_size=1)
    yield {"cpu": None, "cuda": dist.new_group(backend="nccl") if torch.cuda.is_available() else None}
    dist.destroy_process_group()


def _assert_equal_to_flash_attn(q, k, v, group, causal, method, sharding, varlen_cu=None) -> None:
    ref_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    opts = dict(causal=causal, method=method, sharding=sharding, return_attn_probs=True)
    if varlen_cu is None:
        out, lse, _ = fd.ring_flash_attn_func(q, k, v, group, **opts)
        ref, ref_lse, _ = flashlab.flash_attn_func(*ref_in, causal=causal, return_attn_probs=True)
    else:
        n = int((varlen_cu[1:] - varlen_cu[:-1]).max())
        out, lse, _ = fd.ring_flash_attn_varlen_func(q, k, v, varlen_cu, varlen_cu, group, **opts)
        ref, ref_lse, _ = flashlab.flash_attn_varlen_func(*ref_in, varlen_cu, varlen_cu, n, n, causal=causal,
                                                          return_attn_probs=True)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, ref_in, g)):
        assert torch.equal(a, b), f"d{name} differs by {(a.float() - b.float()).abs().max().item():.3e}"


@pytest.mark.parametrize("causal,method,sharding", [(False, "ring", "contiguous"), (True, "allgather", "zigzag")])
def test_world_size_one_equals_flash_attn_func_interpreter(causal, method, sharding, groups) -> None:
    if not interpreting():
        pytest.skip("the CPU variant runs the kernels in the Triton interpreter")
    q, k, v = (torch.randn(1, 19, h, 16, dtype=torch.float16).requires_grad_() for h in (2, 1, 1))
    _assert_equal_to_flash_attn(q, k, v, groups["cpu"], causal, method, sharding)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal,method,sharding", [(False, "ring", "contiguous"), (True, "ring", "zigzag"),
                                                    (True, "allgather", "contiguous")])
def test_world_size_one_equals_flash_attn_func_gpu(dtype, causal, method, sharding, groups) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 1031, h, 128, dtype=dtype, device="cuda").requires_grad_() for h in (16, 4, 4))
    _assert_equal_to_flash_attn(q, k, v, groups["cuda"], causal, method, sharding)
    cu = torch.tensor([0, 300, 301, 1500], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(1500, h, 64, dtype=dtype, device="cuda").requires_grad_() for h in (8, 2, 2))
    _assert_equal_to_flash_attn(q, k, v, groups["cuda"], causal, method, sharding, varlen_cu=cu)


def test_argument_errors_in_one_process(groups, monkeypatch) -> None:
    x = lambda s, h=4, dtype=torch.float16: torch.randn(1, s, h, 8, dtype=dtype)
    f = fd.ring_flash_attn_func
    with pytest.raises(ValueError, match="method must be one of 'ring', 'allgather'"):
        f(x(4), x(4, 2), x(4, 2), method="p2p")
    with pytest.raises(ValueError, match="sharding must be one of"):
        f(x(4), x(4, 2), x(4, 2), sharding="striped")
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        f(x(4), x(4, 2), x(5, 2))
    with pytest.raises(ValueError, match=r"q heads \(3\) must be a multiple of k/v heads \(2\)"):
        f(x(4, 3), x(4, 2), x(4, 2))
    with pytest.raises(TypeError, match="q, k, v must share a dtype"):
        f(x(4), x(4, 2, torch.float32), x(4, 2))
    with pytest.raises(TypeError, match="softmax_scale must be a finite float"):
        f(x(4), x(4, 2), x(4, 2), softmax_scale="0.1")
    with pytest.raises(TypeError, match="group must be a torch.distributed.ProcessGroup"):
        f(x(4), x(4, 2), x(4, 2), "world")
    t = torch.randn(6, 4, 8, dtype=torch.float16)
    with pytest.raises(TypeError, match="cu_seqlens_q must be a 1-D integer tensor"):
        fd.ring_flash_attn_varlen_func(t, t, t, torch.tensor([0.0, 6.0]), torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="cu_seqlens_k must run from 0, non-decreasing, to the local token count 6"):
        fd.ring_flash_attn_varlen_func(t, t, t, torch.tensor([0, 6]), torch.tensor([0, 5]))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="init_process_group"):
        f(x(4), x(4, 2), x(4, 2))
