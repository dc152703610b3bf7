"""Memory layout of feature maps: plain NCHW or channels-last (NHWC memory behind the same NCHW shape).

On the CPU, oneDNN runs the SD VAE's large 3x3 convolutions faster on channels-last input (the maps of 256x256
pixels and more; `docs/performance.md`), because NCHW input is reordered to its blocked layout and back on every
call. The layers
that see such maps (GroupNorm, SiLU, the residual adds, the sub-pixel upsampler, the VAE's spatial attention) keep
the layout, so a whole decoder runs channels-last once its input is.

Levels whose 3x3 convolutions take the Winograd path (`lcmkit.nn.fast`, large maps with many channels) run plain
NCHW instead, since that path needs it and beats oneDNN in either layout there: `level_layout` picks a level's
layout from its first convolution, and a network converts between levels where the choice changes (before an
upsampler rather than after it, where the map is four times smaller).
"""

from __future__ import annotations

import torch

from lcmkit.runtime import MEMORY_FORMATS, MemoryFormat


def is_channels_last(t: torch.Tensor) -> bool:
    """Stored channels-last and not also plain contiguous (maps of 1x1 pixels or 1 channel are both)."""
    return t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def check_memory_format(mode: str) -> MemoryFormat:
    if mode not in MEMORY_FORMATS:
        raise ValueError(f"memory format {mode!r} is not one of {MEMORY_FORMATS}")
    return mode  # type: ignore[return-value]


def wants_channels_last(mode: MemoryFormat, x: torch.Tensor) -> bool:
    """Whether a network in `mode` should run `x` channels-last. "auto": on the CPU in float32, where measured."""
    if mode == "auto":
        return x.device.type == "cpu" and x.dtype == torch.float32
    return mode == "channels_last"


def to_layout(mode: MemoryFormat, x: torch.Tensor) -> torch.Tensor:
    """`x` stored channels-last where `mode` wants it (`wants_channels_last`), else as it is."""
    return x.contiguous(memory_format=torch.channels_last) if wants_channels_last(mode, x) else x


def level_layout(mode: MemoryFormat, x: torch.Tensor, conv: torch.nn.Module, scale: int = 1) -> torch.Tensor:
    """`x` laid out for the level whose first convolution is `conv`, where maps are `scale` times x's height and
    width (2: x is about to be upsampled into that level): plain NCHW where `conv` takes the Winograd path on such a
    map (`lcmkit.nn.conv.Conv2d.takes_winograd`), else as `to_layout` has it. Mode "channels_last" forces
    channels-last everywhere (no Winograd then); "contiguous" leaves x as it is. In mode "auto" a conv whose
    `choose` is "probe" measures which layout oneDNN runs it faster in (`Conv2d.prefers_channels_last`), and
    Winograd is measured against that one."""
    takes_winograd = getattr(conv, "takes_winograd", None)  # lcmkit's Conv2d; a plain nn.Conv2d has none
    if mode == "channels_last" or takes_winograd is None or x.ndim != 4:
        return to_layout(mode, x)
    shape = (x.shape[0], conv.in_channels, x.shape[-2] * scale, x.shape[-1] * scale)
    channels_last = wants_channels_last(mode, x)
    probed = conv.prefers_channels_last(shape) if channels_last else None  # None: not measured
    channels_last = channels_last and probed is not False
    if (
        takes_winograd(shape, x.dtype, x.device, "channels_last" if channels_last else "nchw")
        or probed is False
    ):
        return x.contiguous()
    return to_layout(mode, x)
