"""Sinusoidal timestep features and the MLP that turns them (plus the LCM w-embedding) into `temb`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_features(
    t: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 1.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """DDPM-style sinusoidal features of integer timesteps, shape (len(t), dim).

    Frequencies are exp(-ln(max_period) * i / (half - freq_shift)); `flip_sin_to_cos` puts cos first (SD does).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    exponent = exponent / (half - freq_shift)
    args = t[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


class TimestepEmbedding(nn.Module):
    """`linear_1 -> SiLU -> linear_2`, with the LCM guidance input added first through `cond_proj` (no bias)."""

    def __init__(self, in_channels: int, time_embed_dim: int, cond_proj_dim: int | None = None) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim else None
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, t_emb: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError(
                    "timestep_cond was given but this UNet has no w-embedding input (config.time_cond_proj_dim is None)"
                )
            t_emb = t_emb + self.cond_proj(condition)
        return self.linear_2(F.silu(self.linear_1(t_emb)))
