"""Down- and up-sampling layers (diffusers `Downsample2D` / `Upsample2D` key layout: a single `conv`)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lcmkit.nn.conv import Conv2d
from lcmkit.nn.fast import SUBPIXEL_MIN_PIXELS, DerivedWeight, upsample_subpixel  # noqa: F401

Subpixel = Literal["auto"]


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. `padding=0` is the VAE encoder's form: pad one pixel on the right and bottom only."""

    def __init__(self, channels: int, out_channels: int | None = None, padding: int = 1) -> None:
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(channels, out_channels or channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x (or to `output_size`) followed by a 3x3 conv.

    `subpixel` (a plain attribute, set through `FastPaths.unet_subpixel` / `vae_subpixel`): True runs the 2x case
    in sub-pixel form (`lcmkit.nn.fast.upsample_subpixel`): the same function up to float rounding, with 16
    instead of 36 multiply-adds per 2x2 output block and channel pair, and no 4x upsampled copy of the input.
    "auto" takes it for inputs of at least `SUBPIXEL_MIN_PIXELS` pixels only; False never.
    """

    def __init__(
        self, channels: int, out_channels: int | None = None, subpixel: bool | Subpixel = False
    ) -> None:
        super().__init__()
        self.conv = Conv2d(channels, out_channels or channels, 3, padding=1)
        self.subpixel = subpixel
        self._kernels = DerivedWeight()

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        doubled = output_size is None or tuple(output_size) == (2 * x.shape[-2], 2 * x.shape[-1])
        if doubled and self.subpixel:
            out = upsample_subpixel(self.subpixel, self.conv, x, self._kernels)
            if out is not None:
                return out
        dtype = x.dtype
        if dtype == torch.bfloat16:  # nearest interpolation has no bf16 kernel on some backends
            x = x.float()
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x.to(dtype))
