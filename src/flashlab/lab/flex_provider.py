"""The ``flex`` provider: PyTorch's FlexAttention, torch.compile'd once per shape, with the case's
mask and features as its block mask and score mod (feature_providers.flex_mods). Registered by
providers.py, in its listing's place."""

from __future__ import annotations

import torch

from flashlab.lab import feature_providers as fp
from flashlab.lab.cases import Case
from flashlab.lab.features import has_features
from flashlab.lab.providers import Attn, Provider, _scale, register

_FLEX: dict[str, object] = {}


def _raise_recompile_limits() -> None:
    """Compiling flex_attention per shape hits dynamo's recompile limit, after which it silently runs
    an eager path that materializes the scores (ANCHORS.md): raise the limits, fail loudly past them."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name, value in (("cache_size_limit", 1024), ("recompile_limit", 1024),
                        ("accumulated_cache_size_limit", 4096), ("accumulated_recompile_limit", 4096)):
        try:
            setattr(cfg, name, max(int(getattr(cfg, name)), value))
        except (AttributeError, TypeError):
            pass
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        try:
            getattr(cfg, name)
            setattr(cfg, name, True)
        except AttributeError:
            pass


def _build_flex(case: Case, device: torch.device) -> Attn:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    fn_key = ("fn", device.type)
    if fn_key not in _FLEX:
        _raise_recompile_limits()
        # one compiled function per device type: dynamo compiles it once per shape (dynamic=False) and
        # caches it; a failure while compiling for one device must not send the other's calls to
        # flex's eager path, which materializes the scores
        _FLEX[fn_key] = torch.compile(flex_attention, dynamic=False)
        # The bwd mode replays one graph's backward (retain_graph=True), which a compiled backward
        # with donated buffers refuses; the donation only frees saved tensors early (memory).
        import torch._functorch.config as functorch_config
        if getattr(functorch_config, "donated_buffer", False):
            functorch_config.donated_buffer = False
    compiled = _FLEX[fn_key]
    block_mask, score_mod, layout = None, None, "bhsd"
    if case.dropout:
        raise NotImplementedError("FlexAttention has no dropout")
    if has_features(case):
        key = ("features", case, str(device))
        if key not in _FLEX:
            mask_mod, score_mod, length = fp.flex_mods(case, device)
            # past 16k tokens the eager mask evaluation would materialize length² bools (a varlen batch
            # packs ~130k): let flex compile it blockwise
            big = {"_compile": True} if device.type == "cuda" and length > 16384 else {}
            bm = create_block_mask(mask_mod, None, None, length, length, device=device, **big) if mask_mod else None
            _FLEX[key] = (bm, score_mod)
        block_mask, score_mod = _FLEX[key]
        layout = "packed-bhsd" if case.varlen else "bhsd"
    elif case.causal:
        key = ("mask", case.seqlen_q, case.seqlen_k, str(device))
        if key not in _FLEX:
            offset = case.seqlen_k - case.seqlen_q

            def causal(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202 - flex mask_mod signature
                return q_idx + offset >= kv_idx
            _FLEX[key] = create_block_mask(causal, None, None, case.seqlen_q, case.seqlen_k, device=device)
        block_mask = _FLEX[key]
    scale, gqa = _scale(case), case.kv_heads != case.heads

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    return Attn(fn, layout, "bottom_right")


def _flex_requires() -> str | None:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return f"FlexAttention needs torch >= 2.5 (this is {torch.__version__})"
    return None


register(Provider(
    "flex", "PyTorch FlexAttention, torch.compile'd once per shape (recompile limit raised)",
    build=_build_flex, requires=_flex_requires, default_on=("cuda",)))
