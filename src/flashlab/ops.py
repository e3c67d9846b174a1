"""torch.library ops around the Triton kernels: the only place that launches them.

``flashlab::attn_fwd`` and ``flashlab::attn_bwd`` are opaque ops with explicit fakes (library.py
says why they are not ``triton_op``s), and autograd is registered on the forward: traced code
(torch.compile, export, fake tensors) goes through them. Eager calls skip the dispatcher: a
``torch.autograd.Function`` calls the launchers directly (``_EagerAttention``). Dense calls without
dropout replay the launches recorded for their signature (launch_plans.py). The caller checks
arguments (interface.py). Tensors are either dense — q (batch, seqlen_q, heads, head_dim), k/v
(batch, seqlen_k, kv_heads, head_dim), any strides with a unit-stride head dim, LSE (batch, heads,
seqlen_q) — or packed variable-length — q (total_q, heads, head_dim) with int32 ``cu_seqlens_q``
(batch + 1), LSE (heads, total_q).

Stable entry points (ring attention and split-KV decoding build on them):
* ``attention_forward(q, k, v, softmax_scale, causal, bottom_right, **options) -> (out, lse)``
* ``attention_backward(dout, q, k, v, out, lse, softmax_scale, causal, bottom_right, dlse=None,
  **options) -> (dq, dk, dv)`` — accepts an external out/LSE (e.g. merged across ring steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter

import torch

from flashlab import group_split, launch_plans
from flashlab.block_mask import BlockMask
from flashlab.gluon_backward import fused_eligible, gluon_bwd_eligible, launch_bwd_gluon, launch_bwd_gluon_fused
from flashlab.gluon_forward import gluon_eligible, launch_fwd_gluon, switched_on
from flashlab.kernels.configs import (
    FP_FUSION,
    backward_config,
    cdiv,
    forward_config,
    padded_head_dim,
    preprocess_block_m,
    tile_aligned,
)
from flashlab.launch_args import as4d, clamp_tiles, prepare, strides3
from flashlab.library import attn_bwd_fake, attn_fwd_fake, kernel_op
from flashlab.philox import counter_stride
from flashlab.tma_forward import launch_fwd_tma, tma_eligible, tma_switched_on


def _launch_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
    softmax_scale: float, causal: bool, bottom_right: bool, window_left: int, window_right: int,
    softcap: float, alibi_slopes: torch.Tensor | None, attn_mask: torch.Tensor | None,
    dropout_p: float, seed: int, block_tiles: torch.Tensor | None = None, block_kv: torch.Tensor | None = None,
    block_q: torch.Tensor | None = None, deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    # ``deterministic`` is the backward's (saved with the forward's arguments).
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, bottom_right,
            window_left, window_right, softcap, alibi_slopes, attn_mask, dropout_p, seed, block_tiles, block_kv,
            block_q)
    heads = q.shape[-2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse_shape = (heads, q.shape[0]) if cu_seqlens_q is not None else (q.shape[0], heads, q.shape[1])
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    optional = _optional(args)
    signature = None
    if _plannable(args):
        # The switches pick the kernel: a plan of the `tl` one must not serve a call with one on.
        signature = (forward_config, switched_on("FLASHLAB_FWD_GLUON"), tma_switched_on(),
                     *launch_plans.layout(q, k, v, *optional), *args[7:13], args[16])
    launch_plans.run(signature, (q, k, v, out, lse, *optional),
                     lambda launch_fn: _fwd_launches(out, lse, args, launch_fn))
    return out, lse


_optional = itemgetter(13, 14, 17, 18, 19)  # of the args: ALiBi slopes, attn mask, block-mask tiles and tables


def _plannable(args: tuple) -> bool:
    """Dense calls without dropout (a fresh seed each call) or varlen (its 3-D tensors are viewed as
    4-D per launch) replay launch plans (launch_plans.py): their launch arguments depend only on the
    layouts — the optional tensors' too — and the scalar options (args[7:13]: scale, causal,
    bottom_right, window, softcap; args[16]: the seed, unread without dropout)."""
    return args[3] is None and args[15] == 0 and args[0].dim() == 4


def _fwd_launches(out: torch.Tensor, lse: torch.Tensor, args: tuple, launch_fn) -> object:
    """The forward's launch into ``out`` / ``lse``: Gluon's on Hopper in its scope, the opt-in TMA one,
    or the `tl` kernel; ``args`` as _launch_fwd's. The first two launch outside ``launch_fn`` (their
    tensor descriptors are built per call) and say so: launch_plans.UNPLANNED."""
    from flashlab.kernels import forward as fwd_kernels  # here: importing flashlab needs no Triton
    run = prepare(*args)
    if gluon_eligible(run.flags, run.head_dim, run.seqlen_q, run.seqlen_k, run.scalars[1], run.q4, run.k4, run.v4):
        launch_fwd_gluon(run.q4, run.k4, run.v4, as4d(out), lse, run.lse_strides, run.scalars[2],
                         run.flags["HAS_UPPER"], run.flags["BOTTOM_RIGHT"])
        return launch_plans.UNPLANNED
    q = args[0]
    varlen = args[3] is not None
    block_d = padded_head_dim(run.head_dim)
    aligned = tile_aligned(run.seqlen_q, run.seqlen_k, varlen)
    cfg = clamp_tiles(forward_config(block_d, run.flags["HAS_UPPER"], q.device, aligned), run)
    if tma_eligible(run.flags, run.head_dim, run.q4, run.k4, run.v4, out):
        launch_fwd_tma(run.q4, run.k4, run.v4, out, lse, run.lse_strides, run.seqlen_q, run.seqlen_k, run.heads,
                       run.kv_heads, run.head_dim, block_d, run.scalars, run.flags, cfg)
        return launch_plans.UNPLANNED
    grid = (cdiv(run.seqlen_q, cfg.block_m), run.heads, run.batch)
    out4 = as4d(out)
    launch_fn(
        fwd_kernels.attn_fwd_kernel, grid,
        run.q4, run.k4, run.v4, out4, lse, run.cu_q, run.cu_k, run.slopes, run.mask, run.sparse_kv,
        *strides3(run.q4, varlen), *strides3(run.k4, varlen), *strides3(run.v4, varlen),
        *strides3(out4, varlen), *run.lse_strides, *run.slope_strides, *run.mask_strides,
        *run.sparse_kv_strides, run.seqlen_q, run.seqlen_k, run.heads // run.kv_heads, *run.scalars,
        HEAD_DIM=run.head_dim, BLOCK_D=block_d, **run.flags, **cfg.launch_kwargs(), **FP_FUSION,
    )


attn_fwd = kernel_op("flashlab::attn_fwd", mutates_args=(), fake=attn_fwd_fake, opaque=True)(_launch_fwd)


def _launch_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dlse: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
    softmax_scale: float, causal: bool, bottom_right: bool, window_left: int, window_right: int,
    softcap: float, alibi_slopes: torch.Tensor | None, attn_mask: torch.Tensor | None,
    dropout_p: float, seed: int, block_tiles: torch.Tensor | None = None, block_kv: torch.Tensor | None = None,
    block_q: torch.Tensor | None = None, deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, bottom_right,
            window_left, window_right, softcap, alibi_slopes, attn_mask, dropout_p, seed, block_tiles, block_kv,
            block_q)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    delta = torch.empty_like(lse)
    tensors = (dout, q, k, v, out, lse, dq, dk, dv, delta)
    optional = _optional(args)
    signature = None
    if dlse is None and _plannable(args):
        signature = (backward_config, switched_on("FLASHLAB_BWD_GLUON"), deterministic,
                     *launch_plans.layout(dout, q, k, v, out, lse, *optional), *args[7:13], args[16])
    launch_plans.run(signature, (*tensors, *optional),
                     lambda launch_fn: _bwd_launches(tensors, dlse, args, launch_fn, deterministic))
    return dq, dk, dv


def _bwd_launches(tensors: tuple, dlse: torch.Tensor | None, args: tuple, launch_fn, deterministic: bool) -> object:
    """The backward's three launches (the preprocess, then dK/dV and dQ: Gluon's on Hopper in their
    scope — one fused kernel with dQ by atomics where gluon_backward.fused_eligible says, else two —
    outside ``launch_fn``, which returns launch_plans.UNPLANNED; else the `tl` kernels); ``tensors``
    as _launch_bwd's, ``args`` as _launch_fwd's."""
    from flashlab.kernels import backward as bwd_kernels
    dout, q, _, _, out, lse, dq, dk, dv, delta = tensors
    run = prepare(*args)
    varlen = args[3] is not None
    block_d = padded_head_dim(run.head_dim)
    dq4, dk4, dv4, do4, o4 = (as4d(t) for t in (dq, dk, dv, dout, out))
    common = (run.seqlen_q, run.seqlen_k, run.heads // run.kv_heads, *run.scalars)
    head = (*run.lse_strides, *run.slope_strides, *run.mask_strides)
    consts = dict(HEAD_DIM=run.head_dim, BLOCK_D=block_d, **run.flags)

    pre_m = preprocess_block_m(block_d)
    launch_fn(
        bwd_kernels.attn_bwd_preprocess_kernel, (cdiv(run.seqlen_q, pre_m), run.heads, run.batch),
        # Without dlse, lse stands in as the unread pointer (never delta, which this kernel writes).
        o4, do4, dlse if dlse is not None else lse, delta, run.cu_q,
        *strides3(o4, varlen), *strides3(do4, varlen), *run.lse_strides, run.seqlen_q,
        HEAD_DIM=run.head_dim, BLOCK_D=block_d, BLOCK_M=pre_m, HAS_DLSE=dlse is not None, IS_VARLEN=varlen,
        **FP_FUSION,
    )
    if gluon_bwd_eligible(run.flags, run.head_dim, run.seqlen_q, run.seqlen_k, run.scalars[1], run.q4, run.k4,
                          run.v4):
        fused = fused_eligible(run.flags["HAS_UPPER"], run.seqlen_q, run.seqlen_k, run.head_dim, deterministic,
                               run.heads // run.kv_heads)
        (launch_bwd_gluon_fused if fused else launch_bwd_gluon)(
            run.q4, run.k4, run.v4, do4, dq4, dk4, dv4, lse, delta, run.lse_strides, run.scalars[2],
            run.flags["HAS_UPPER"], run.flags["BOTTOM_RIGHT"])
        return launch_plans.UNPLANNED
    aligned = tile_aligned(run.seqlen_q, run.seqlen_k, varlen)
    cfg_kv, cfg_q = (clamp_tiles(c, run) for c in backward_config(block_d, run.flags["HAS_UPPER"], q.device,
                                                                    aligned, run.seqlen_k, run.flags["HAS_DROPOUT"]))
    # A split group writes fp32 partials: scratch tensors a planned call allocates again.
    split = group_split.targets(dk4, dv4, run.batch, run.kv_heads, run.heads // run.kv_heads, run.seqlen_q,
                                run.seqlen_k, cfg_kv.block_m, cfg_kv.block_n, group_split.upper_diagonal(run),
                                # Two programs share an SM at head dim 64 (registers: 4 warps, 32-row tiles).
                                2 if block_d <= 64 else 1,
                                lambda shape: launch_plans.scratch(launch_fn, shape, torch.float32, q.device))
    launch_fn(
        bwd_kernels.attn_bwd_dkdv_kernel, (cdiv(run.seqlen_k, cfg_kv.block_n), run.kv_heads,
                                           run.batch * split.splits),
        run.q4, run.k4, run.v4, do4, lse, delta, split.dk, split.dv, run.cu_q, run.cu_k, run.slopes, run.mask,
        run.sparse_q, *strides3(run.q4, varlen), *strides3(run.k4, varlen), *strides3(run.v4, varlen),
        *strides3(do4, varlen), *split.strides(varlen), *head, *run.sparse_q_strides, *common,
        split.heads_per_split, split.stride_split,
        **consts, **cfg_kv.launch_kwargs(), **FP_FUSION,
    )
    split.finish(dk4, dv4, launch_fn)
    launch_fn(
        bwd_kernels.attn_bwd_dq_kernel, (cdiv(run.seqlen_q, cfg_q.block_m), run.heads, run.batch),
        run.q4, run.k4, run.v4, do4, lse, delta, dq4, run.cu_q, run.cu_k, run.slopes, run.mask, run.sparse_kv,
        *strides3(run.q4, varlen), *strides3(run.k4, varlen), *strides3(run.v4, varlen),
        *strides3(do4, varlen), *strides3(dq4, varlen), *head, *run.sparse_kv_strides, *common,
        **consts, **cfg_q.launch_kwargs(), **FP_FUSION,
    )


attn_bwd = kernel_op("flashlab::attn_bwd", mutates_args=(), fake=attn_bwd_fake, opaque=True)(_launch_bwd)

_FWD_ARGS = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "softmax_scale",
             "causal", "bottom_right", "window_left", "window_right", "softcap", "alibi_slopes", "attn_mask",
             "dropout_p", "seed", "block_tiles", "block_kv", "block_q", "deterministic")


_SAVED = ("alibi_slopes", "attn_mask", "block_tiles", "block_kv", "block_q")


def _setup_context(ctx, inputs, output) -> None:
    args = dict(zip(_FWD_ARGS, inputs))
    out, lse = output
    ctx.save_for_backward(args["q"], args["k"], args["v"], out, lse, args["cu_seqlens_q"], args["cu_seqlens_k"],
                          args["alibi_slopes"], args["attn_mask"], args.get("block_tiles"), args.get("block_kv"),
                          args.get("block_q"))
    ctx.scalars = {name: args[name] for name in _FWD_ARGS[5:] if name in args and name not in _SAVED}


def _backward(ctx, dout: torch.Tensor | None, dlse: torch.Tensor | None, run_bwd=attn_bwd):
    q, k, v, out, lse, cu_q, cu_k, slopes, mask, block_tiles, block_kv, block_q = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    elif dout.stride(-1) != 1:
        dout = dout.contiguous()
    if dlse is not None:
        dlse = dlse.contiguous()  # the kernel reads it with the LSE's strides (e.g. not an expanded sum's grad)
    s = ctx.scalars
    dq, dk, dv = run_bwd(dout, q, k, v, out, lse, dlse, cu_q, cu_k, s["max_seqlen_q"], s["max_seqlen_k"],
                         s["softmax_scale"], s["causal"], s["bottom_right"], s["window_left"], s["window_right"],
                         s["softcap"], slopes, mask, s["dropout_p"], s["seed"], block_tiles, block_kv, block_q,
                         s.get("deterministic", False))
    return (dq, dk, dv) + (None,) * (len(_FWD_ARGS) - 3)


torch.library.register_autograd("flashlab::attn_fwd", _backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """Eager autograd around the launchers, bypassing the dispatcher: with inputs that require grad,
    the op's registered autograd costs ~90 µs of host time per forward more than the launch itself
    (torch 2.13, CPU), this ~8 µs. At short sequences the host, not the GPU, sets the pace
    (docs/perf-notes.md, round 4). Traced code uses the op."""

    @staticmethod
    def forward(ctx, *inputs):
        ctx.set_materialize_grads(False)
        out, lse = _launch_fwd(*inputs)
        _setup_context(ctx, inputs, (out, lse))
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels' gradients have no gradient of their own
    def backward(ctx, dout, dlse):
        return _backward(ctx, dout, dlse, run_bwd=_launch_bwd)


def _plain_eager(*tensors: torch.Tensor | None) -> bool:
    """True when the launchers may run directly: not tracing, no dispatch mode or functorch
    transform active, and only plain tensors (not fake tensors or other subclasses)."""
    return (not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._are_functorch_transforms_active()
            and all(t is None or type(t) is torch.Tensor for t in tensors))


@dataclass(frozen=True)
class AttentionOptions:
    """Optional features of the kernels (defaults: none of them)."""

    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi_slopes: torch.Tensor | None = None
    attn_mask: torch.Tensor | None = None
    dropout_p: float = 0.0
    seed: int = 0
    block_mask: BlockMask | None = None
    deterministic: bool = False  # the backward's: bit-identical gradients (no float atomics)

    def args(self) -> tuple:
        return (self.cu_seqlens_q, self.cu_seqlens_k, self.max_seqlen_q, self.max_seqlen_k)

    def tail(self) -> tuple:
        sparse = (None, None, None)
        if self.block_mask is not None:
            sparse = (self.block_mask.tiles, self.block_mask.kv_table, self.block_mask.q_table)
        return (self.window_left, self.window_right, self.softcap, self.alibi_slopes, self.attn_mask,
                self.dropout_p, self.seed, *sparse, self.deterministic)


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool, bottom_right: bool,
    options: AttentionOptions | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable forward: ``(out, lse)``. Dense: out (batch, seqlen_q, heads, head_dim)
    contiguous, lse fp32 (batch, heads, seqlen_q); varlen: out (total_q, heads, head_dim), lse
    (heads, total_q). LSE is the natural log, -inf for rows that see no key."""
    options = options or AttentionOptions()
    args = (q, k, v, *options.args(), softmax_scale, causal, bottom_right, *options.tail())
    if torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling():
        raise NotImplementedError("flashlab attention does not support torch.func transforms (grad, vjp, jvp, "
                                  "vmap); differentiate with torch.autograd (loss.backward() / torch.autograd.grad)")
    if not _plain_eager(q, k, v, options.attn_mask, options.alibi_slopes):
        return torch.ops.flashlab.attn_fwd(*args)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _EagerAttention.apply(*args)
    return _launch_fwd(*args)


def attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    softmax_scale: float, causal: bool, bottom_right: bool, dlse: torch.Tensor | None = None,
    options: AttentionOptions | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) from an output and LSE computed elsewhere (same layouts as forward).
    ``dlse`` is the gradient flowing into the LSE, if any."""
    options = options or AttentionOptions()
    args = (dout, q, k, v, out, lse, dlse, *options.args(), softmax_scale, causal, bottom_right, *options.tail())
    return (_launch_bwd if _plain_eager(dout, q, k, v, out, lse) else torch.ops.flashlab.attn_bwd)(*args)


def dropout_pattern(batch: int, heads: int, seqlen_q: int, seqlen_k: int, options: AttentionOptions,
                    device: torch.device | str = "cuda") -> torch.Tensor:
    """The bool (batch, heads, seqlen_q, seqlen_k) pattern of weights that dense attention with
    ``options.dropout_p`` / ``options.seed`` keeps (True) — for tests and inspection."""
    from flashlab.kernels.scores import dropout_pattern_kernel

    keep = torch.empty((batch, heads, seqlen_q, seqlen_k), dtype=torch.uint8, device=device)
    if keep.numel():
        grid = (cdiv(seqlen_q, 32), heads, batch)
        dropout_pattern_kernel[grid](keep, options.seed, options.dropout_p, seqlen_q, seqlen_k,
                                     counter_stride(seqlen_k), BLOCK_M=32, BLOCK_N=64)
    return keep.view(torch.bool)
