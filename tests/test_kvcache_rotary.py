"""flash_attn_with_kvcache's rotary_cos / rotary_sin (flash-attn's convention): the new keys are
rotated at their cache positions before the append, the queries at theirs (causal or windowed) or
all at cache_seqlens; checked against an independent rotation (complex multiplication in fp64)."""

from __future__ import annotations

import pytest
import torch
from attn_checks import check_against_reference
from test_kvcache import gather, make_case

from flashlab import flash_attn_with_kvcache


def tables(seqlen_ro: int, rotary_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(seqlen_ro, dtype=torch.float64)[:, None] * inv_freq
    return angles.cos().float().to(device), angles.sin().float().to(device)


def rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, interleaved: bool):
    """The pairs as complex numbers, multiplied by e^{iθ}."""
    rot = 2 * cos.shape[1]
    xr = x[..., :rot].double()
    pairs = (xr[..., 0::2], xr[..., 1::2]) if interleaved else (xr[..., : rot // 2], xr[..., rot // 2:])
    z = torch.complex(*pairs) * torch.complex(cos.double()[pos], sin.double()[pos])[:, :, None, :]
    out = torch.stack((z.real, z.imag), -1).flatten(-2) if interleaved else torch.cat((z.real, z.imag), -1)
    return torch.cat((out.to(x.dtype), x[..., rot:]), -1)


def _check(device, causal: bool, window, interleaved: bool, rotary_dim: int) -> None:
    torch.manual_seed(rotary_dim + interleaved)
    lens = [5, 0, 12]
    q, k_cache, v_cache, k, v, seqlens = make_case(3, 3, 4, 2, 32, lens, 3, 20, torch.float16, device)
    cos, sin = tables(20, rotary_dim, device)
    want_cache = k_cache.clone()
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=causal, window_size=window,
                                  rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved)
    pos = seqlens.long()[:, None] + torch.arange(3, device=device)
    q_pos = pos if causal or window != (-1, -1) else pos[:, :1].expand(3, 3)
    k_rot, q_rot = rotated(k, cos, sin, pos, interleaved), rotated(q, cos, sin, q_pos, interleaved)
    for b, n in enumerate(lens):
        want_cache[b, n:n + 3] = k_rot[b]
    # one rounding to fp16 on each side: at most one ulp apart
    torch.testing.assert_close(k_cache, want_cache, rtol=2**-10, atol=2**-10)
    for b, n in enumerate(lens):
        kb, vb = gather(k_cache, b, n + 3), gather(v_cache, b, n + 3)
        check_against_reference(out[b:b + 1], q_rot[b:b + 1], kb, vb, grads=False, causal=causal, window_size=window)


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (-1, -1)), (False, (4, 1))],
                         ids=["causal", "full", "window"])
def test_rotary_matches_an_independent_rotation(device, causal, window, interleaved):
    _check(device, causal, window, interleaved, rotary_dim=16)


def test_rotary_full_head_dim_on_the_torch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _check("cpu", True, (-1, -1), False, rotary_dim=32)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"rotary_cos": torch.ones(20, 8)}, ValueError, "must be given together"),
    ({"rotary_cos": torch.ones(20, 8), "rotary_sin": torch.ones(20, 8), "k": None, "v": None}, ValueError,
     "they need k and v"),
    ({"rotary_cos": torch.ones(20, 20), "rotary_sin": torch.ones(20, 20)}, ValueError, r"rotary_dim ≤ head_dim \(32\)"),
    ({"rotary_cos": torch.ones(20, 8, dtype=torch.int32), "rotary_sin": torch.ones(20, 8, dtype=torch.int32)},
     TypeError, "rotary_cos must be a float tensor"),
    ({"rotary_cos": torch.ones(6, 8), "rotary_sin": torch.ones(6, 8)}, ValueError,
     "rotary_cos/rotary_sin have 6 positions; the new tokens reach position 14"),
], ids=["cos-alone", "no-new-keys", "too-wide", "int-tables", "too-short"])
def test_rotary_arguments_are_checked(kwargs, exc, match):
    q, k_cache, v_cache, k, v, seqlens = make_case(3, 3, 4, 2, 32, [5, 0, 12], 3, 20, torch.float16, "cpu")
    args = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v, "cache_seqlens": seqlens, **kwargs}
    with pytest.raises(exc, match=match):
        flash_attn_with_kvcache(**args)
