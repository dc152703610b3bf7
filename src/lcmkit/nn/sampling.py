"""Down- and up-sampling layers (diffusers `Downsample2D` / `Upsample2D` key layout: a single `conv`)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lcmkit.nn.conv import Conv2d, DerivedWeight, capturing_graph
from lcmkit.nn.fast_upsample import nearest2x_conv3x3, subpixel_kernels

Subpixel = Literal["auto"]
# "auto": the sub-pixel form where it measured faster. Its four phase kernels are 16/9 the size of the 3x3 weight,
# which dominates small maps: the SD UNet's upsamplers on a 2-core AVX-512 VM, reference form -> sub-pixel, 1280 ch
# at 8x8 39 -> 68 ms, at 16x16 127 -> 116 ms, 640 ch at 32x32 149 -> 64 ms.
SUBPIXEL_MIN_PIXELS = 32 * 32


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

    With `subpixel = True` (a plain attribute; `AutoencoderKL.enable_subpixel_upsampling()` sets it) the 2x case
    runs in sub-pixel form (`lcmkit.nn.fast_upsample`): the same function up to float rounding, with 16 instead of
    36 multiply-adds per 2x2 output block and channel pair, and no 4x upsampled copy of the input. With
    `subpixel = "auto"` (the UNet's default) only inputs of at least `SUBPIXEL_MIN_PIXELS` pixels take it, and
    graphs being traced, scripted or compiled keep the reference form.
    """

    def __init__(
        self, channels: int, out_channels: int | None = None, subpixel: bool | Subpixel = False
    ) -> None:
        super().__init__()
        self.conv = Conv2d(channels, out_channels or channels, 3, padding=1)
        self.subpixel = subpixel
        self._kernels = DerivedWeight()

    def _subpixel_kernels(self) -> torch.Tensor:
        """Phase kernels, cached until the weight is replaced, changed in place, moved or cast.

        Computed fresh under autograd, and for weights made under `inference_mode` (no version counter).
        """
        w = self.conv.weight
        fresh = (torch.is_grad_enabled() and w.requires_grad) or w.is_inference()
        return subpixel_kernels(w) if fresh else self._kernels.get(w, subpixel_kernels)

    def _takes_subpixel(self, x: torch.Tensor) -> bool:
        if self.subpixel == "auto":
            return not capturing_graph() and x.shape[-2] * x.shape[-1] >= SUBPIXEL_MIN_PIXELS
        return bool(self.subpixel)

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        doubled = output_size is None or tuple(output_size) == (2 * x.shape[-2], 2 * x.shape[-1])
        if doubled and self._takes_subpixel(x):
            return nearest2x_conv3x3(x, self.conv.weight, self.conv.bias, kernels=self._subpixel_kernels())
        dtype = x.dtype
        if dtype == torch.bfloat16:  # nearest interpolation has no bf16 kernel on some backends
            x = x.float()
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x.to(dtype))
