"""`Conv2d`: `nn.Conv2d` (same parameters, same state-dict keys) that takes the CPU's fast convolution paths.

Its forward is `nn.Conv2d`'s unless a fast path applies: oneDNN weight pre-packing on small maps (`prepack`) or
NNPACK's Winograd transform on large ones (`winograd`); both live in `lcmkit.nn.fast` and are set model-wide
through `lcmkit.runtime.FastPaths`. `set_conv_prepacking` / `set_conv_winograd` set them on every `Conv2d` inside
any module.
"""

from __future__ import annotations

import torch
from torch import nn

from lcmkit.nn import fast
from lcmkit.nn.fast import (  # noqa: F401  (re-exported: their home was this module)
    PACKED_MAX_PIXELS,
    WINOGRAD_MIN_CHANNELS,
    WINOGRAD_MIN_PIXELS,
    DerivedWeight,
    capturing_graph,
    winograd_available,
)
from lcmkit.nn.lora import LoraLayer
from lcmkit.runtime import MODES, Choose, Mode

Prepack = Mode
PREPACK_MODES = MODES
Winograd = Mode
WINOGRAD_MODES = MODES


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` with oneDNN weight pre-packing and the Winograd path for inference (`lcmkit.nn.fast.conv2d`).

    Packing applies to 3x3, ungrouped, zero-padded convolutions with at least 16 input and output channels on inputs
    of at most `PACKED_MAX_PIXELS` pixels, run on CPU in float32 with autograd off (or with nothing requiring grad);
    `prepack`: "auto" (memory-mapped weights only), "always", "off" (also no `add_into`). The Winograd path
    (`winograd`: "auto" by size, "always" at any size, "off") applies to 3x3, stride-1, padding-1, ungrouped,
    zero-padded convolutions on plain NCHW inputs under the same conditions; every other call is `nn.Conv2d`'s.
    `choose`: "thresholds" (a layer's own default: the sizes above) or "probe" (what `FastPaths.default()` sets:
    measured per input shape on this machine within `lcmkit.nn.fast`'s `PROBE_*` regions, `lcmkit.nn.probe`).
    """

    def __init__(
        self,
        *args,
        prepack: Prepack = "auto",
        winograd: Winograd = "auto",
        choose: Choose = "thresholds",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.prepack: Prepack = prepack
        self.winograd: Winograd = winograd
        self.choose: Choose = choose  # how "auto" decides: measured per shape ("probe") or fixed thresholds
        self._packed = DerivedWeight()  # value None: this weight stays on the plain path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = fast.conv2d(self, x, self._packed)
        return super().forward(x) if out is None else out

    def add_into(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor | None:
        """`other += self(x)` in place and return `other`, or None where that does not apply
        (`lcmkit.nn.fast.conv2d_add_into`)."""
        return fast.conv2d_add_into(self, x, other)

    def takes_winograd(
        self,
        shape: tuple[int, ...] | torch.Size,
        dtype: torch.dtype,
        device: torch.device,
        alternative: str = "nchw",
    ) -> bool:
        """Whether a plain NCHW input of this shape, dtype and device would take the Winograd path (autograd
        aside): what a network asks when it picks the layout of a level (`lcmkit.nn.layout`); a probe compares it
        with oneDNN on `alternative` ("nchw" or "channels_last")."""
        return fast.takes_winograd(self, shape, dtype, device, alternative)

    def prefers_channels_last(self, shape: tuple[int, ...] | torch.Size) -> bool | None:
        """Probed: whether oneDNN runs this conv faster on channels-last maps of this NCHW shape; None where this
        layer does not probe (`lcmkit.nn.fast.prefers_channels_last`)."""
        return fast.prefers_channels_last(self, shape)


def set_conv_winograd(module: nn.Module, mode: Winograd) -> int:
    """Set `winograd` on every lcmkit `Conv2d` inside `module`; returns how many there are."""
    return _set_on_convs(module, "winograd", mode, WINOGRAD_MODES)


def set_conv_prepacking(module: nn.Module, mode: Prepack) -> int:
    """Set `prepack` on every lcmkit `Conv2d` inside `module`; returns how many there are."""
    return _set_on_convs(module, "prepack", mode, PREPACK_MODES)


def _set_on_convs(module: nn.Module, attribute: str, mode: str, modes: tuple[str, ...]) -> int:
    if mode not in modes:
        raise ValueError(f"conv {attribute} mode {mode!r} is not one of {modes}")
    count = 0
    for layer in module.modules():
        layer = layer.base if isinstance(layer, LoraLayer) else layer  # the conv a LoRA wrapper runs
        if isinstance(layer, Conv2d):
            setattr(layer, attribute, mode)
            count += 1
    return count
