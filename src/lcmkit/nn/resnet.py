"""Residual block shared by the UNet and the VAE (diffusers `ResnetBlock2D` key layout)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lcmkit.nn.conv import Conv2d
from lcmkit.nn.fast import forward_hooked, resnet_block  # noqa: F401  (forward_hooked: re-exported)


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv, plus an optional time embedding, twice, with a residual path.

    Attribute names (`norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`) are the checkpoint keys.
    `temb_channels=None` gives the VAE's variant without a time embedding. Without autograd the same sum runs as
    `lcmkit.nn.fast.resnet_block` where `inplace_activations` or `residual_into_conv` is on (`FastPaths`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        temb_channels: int | None = 512,
        groups: int = 32,
        eps: float = 1e-6,
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
    ) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        # True where the caller never reads the block's input again (the VAE's chains of blocks): a fact about
        # where the block sits, which lets `residual_into_conv` write the residual sum into the input
        self.sum_into_input = False
        self.inplace_activations = True  # FastPaths.inplace_activations
        self.residual_into_conv = True  # FastPaths.residual_into_conv

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        if (self.inplace_activations or self.residual_into_conv) and not torch.is_grad_enabled():
            return resnet_block(self, x, temb)
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.dropout(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + self.conv2(h)
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out
