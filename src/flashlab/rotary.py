"""Rotary position embeddings (RoPE, Su et al. 2021) in the "rotate half" convention of Llama / GPT-NeoX.

Channel ``i < head_dim / 2`` is paired with channel ``i + head_dim / 2``; the pair at position ``p``
is rotated by the angle ``p · base^(-2i / head_dim)``. Rotating q and k this way makes ``q·k``
depend on positions only through their difference.
"""

from __future__ import annotations

import torch


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for positions, computed in fp32 and cast to the input's dtype.

    Args:
        head_dim: even, the size of each head.
        base: the wavelength base (10000 in the RoPE paper and Llama 2; Llama 3 uses 500000).
    """

    def __init__(self, head_dim: int, base: float = 10000.0, device: torch.device | str | None = None) -> None:
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim must be an even int >= 2 for rotary embeddings, got {head_dim!r}")
        if not isinstance(base, (int, float)) or base <= 1:
            raise ValueError(f"base must be a number > 1, got {base!r}")
        self.head_dim = head_dim
        self.base = float(base)
        inv_freq = 1.0 / (self.base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of shape ``positions.shape + (head_dim,)`` for integer ``positions``."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., seqlen, heads, head_dim) by ``cos``/``sin`` (..., seqlen, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[..., None, :] + rotated * sin[..., None, :]


def rotate_at_positions(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                        interleaved: bool) -> torch.Tensor:
    """flash-attn's rotary convention (its ``rotary_cos`` / ``rotary_sin`` tables): rotate the first
    ``rotary_dim = 2 · cos.shape[1]`` channels of ``x`` (batch, seqlen, heads, head_dim) by the table
    rows ``positions`` (batch, seqlen); the other channels pass through. Pairs are channels
    (i, i + rotary_dim / 2) (GPT-NeoX) or, with ``interleaved``, (2i, 2i + 1) (GPT-J). Computed in
    fp32, returned in x's dtype."""
    rot = 2 * cos.shape[1]
    c = cos.float()[positions][:, :, None, :]  # (batch, seqlen, 1, rot / 2)
    s = sin.float()[positions][:, :, None, :]
    xr = x[..., :rot].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
        rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., rot:]), dim=-1)
