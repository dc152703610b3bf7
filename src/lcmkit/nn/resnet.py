"""Residual block shared by the UNet and the VAE (diffusers `ResnetBlock2D` key layout)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from lcmkit.nn.conv import Conv2d


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv, plus an optional time embedding, twice, with a residual path.

    Attribute names (`norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`) are the checkpoint keys.
    `temb_channels=None` gives the VAE's variant without a time embedding.
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
        # True where the caller never reads the block's input again (the VAE's chains of blocks): without autograd,
        # conv2 may then write its result straight into the input as the residual sum (`Conv2d.add_into`)
        self.sum_into_input = False

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        # Without autograd, the SiLUs and the residual add reuse tensors this block just made instead of allocating:
        # at the VAE decoder's 512x512 level one activation is 134 MB, and a fresh one costs ~45 ms of page faults
        # (SiLU 68 ms allocating, 16 ms in place, on a 2-core VM). Not while a hook on a norm may keep its output.
        reuse = not torch.is_grad_enabled() and not (self.norm1._forward_hooks or self.norm2._forward_hooks)
        h = self.conv1(F.silu(self.norm1(x), inplace=reuse))
        if self.time_emb_proj is not None and temb is not None:
            step = self.time_emb_proj(F.silu(temb))[:, :, None, None]
            h = h.add_(step) if reuse else h + step
        h = self.dropout(F.silu(self.norm2(h), inplace=reuse))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)  # a fresh tensor: ours to write into, unless a hook kept it
            owned = not forward_hooked(self.conv_shortcut)
        else:
            owned = self.sum_into_input and not forward_hooked(self)
        fuse = reuse and owned and isinstance(self.conv2, Conv2d) and not forward_hooked(self.conv2)
        out = self.conv2.add_into(h, x) if fuse else None  # x + conv2(h), written into x
        if out is None:
            h = self.conv2(h)
            out = h.add_(x) if reuse else x + h  # same sum: addition is commutative in floating point
        if self.output_scale_factor != 1.0:
            out = out.div_(self.output_scale_factor) if reuse else out / self.output_scale_factor
        return out


def forward_hooked(module: nn.Module) -> bool:
    """Forward hooks that could see (or expect to see) this module's input or output: its own or global ones."""
    return bool(
        module._forward_pre_hooks
        or module._forward_hooks
        or torch_module._global_forward_pre_hooks
        or torch_module._global_forward_hooks
    )
