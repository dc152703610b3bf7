"""`Conv2d` whose no-grad CPU float32 forward uses a weight pre-packed in oneDNN's blocked layout.

`F.conv2d` on CPU hands oneDNN a plain (O, I, kH, kW) weight, which oneDNN reorders into its blocked layout on every
call. For the UNet's deep levels that reorder is a large part of the work: a 1280-channel 3x3 weight is 59 MB, while
the convolution at 8x8 latents is under 2 GFLOP (SD1.5 at 512x512: 57 ms plain against 20 ms packed, 16x16: 97 against
67 ms, on a 2-core AVX-512 VM). Packing once per weight removes it; the arithmetic is oneDNN's either way (the outputs
agree to float rounding, about 1e-6 relative).

The packed copy is extra memory, so by default (`prepack = "auto"`) a weight is packed only when its own pages are
file-backed (a memory-mapped safetensors file): right after packing, those pages are handed back to the OS
(`lcmkit.loading.paging`), so the layer costs no memory. In-memory weights (a fused LoRA, a converted single-file
checkpoint, anything cast or trained) keep the plain path unless `prepack = "always"`; `"off"` never packs (and
turns off `add_into`, a convolution summed straight into a residual).
The packed copy is remade when the weight is replaced, cast or moved, or changed in place (its version counter);
a change made through `.data` bypasses that counter and is not seen, as with any cached derived tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from lcmkit.loading.paging import release_weight_pages
from lcmkit.nn.layout import is_channels_last

Prepack = Literal["auto", "always", "off"]
PREPACK_MODES = ("auto", "always", "off")
# Packing pays where the weight is large next to the activations (the UNet's 32x32 and smaller levels); at 64x64 and
# above it measured the same or slower than the plain path (e.g. 512 channels at 128x128: 612 against 518 ms).
PACKED_MAX_PIXELS = 32 * 32


def _mkldnn_ready() -> bool:
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def _capturing() -> bool:
    """Traced, scripted, compiled or exported: graphs (OpenVINO, ONNX, inductor) get the plain convolution."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()


class DerivedWeight:
    """A tensor made from a weight (a packed copy, sub-pixel kernels), cached until the weight is replaced, cast,
    moved or changed in place (its version counter); dropped, not copied, when the module is copied or pickled."""

    __slots__ = ("source", "key", "value")

    def __init__(self) -> None:
        self.source: torch.Tensor | None = None
        self.key: tuple | None = None
        self.value: Any = None

    def get(self, weight: torch.Tensor, make: Callable[[torch.Tensor], Any], *extra: object) -> Any:
        """`make(weight)`, or the cached result when `weight` (and `extra`) are what it was made from."""
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, *extra)
        if self.source is not weight or self.key != key:
            self.source, self.key, self.value = weight, key, make(weight)
        return self.value

    def __deepcopy__(self, memo: dict) -> DerivedWeight:
        return DerivedWeight()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters, same state-dict keys) with oneDNN weight pre-packing for inference.

    Packing applies to 3x3, ungrouped, zero-padded convolutions with at least 16 input and output channels on inputs
    of at most `PACKED_MAX_PIXELS` pixels, run on CPU in float32 with autograd off (or with nothing requiring grad);
    every other call is `nn.Conv2d`'s.
    """

    def __init__(self, *args, prepack: Prepack = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.prepack: Prepack = prepack
        self._packed = DerivedWeight()  # value None: this weight stays on the plain path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = None
        if self._packable(x):
            packed = self._packed.get(self.weight, lambda w: self._pack(w, x), self.prepack)
        if packed is None:
            return super().forward(x)
        pad, stride, dilation = list(self.padding), list(self.stride), list(self.dilation)
        return torch.ops.mkldnn._convolution_pointwise(
            x, packed, self.bias, pad, stride, dilation, 1, "none", [], ""
        )

    def add_into(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor | None:
        """`other += self(x)` in place, as one oneDNN convolution with a sum post-op, and return `other`; or None
        (nothing done) where that does not apply. For same-size convolutions (`other` has x's batch and pixels) on
        inputs of more than `PACKED_MAX_PIXELS` pixels, on the CPU in float32 without autograd: there, writing the
        convolution straight into the residual saves a fresh activation (page faults: ~45 ms for 134 MB) and a pass
        of the add (128 ch at 512x512: 350 -> 290 ms). Bitwise the same as `other + self(x)` in our tests.
        `prepack = "off"` turns this off too (plain `F.conv2d` only)."""
        if not (
            self._onednn_inference(x, other)
            and self.padding_mode == "zeros"
            and isinstance(self.padding, tuple)
            and x.ndim == 4
            and x.shape[-2] * x.shape[-1] > PACKED_MAX_PIXELS
            and other.shape == (x.shape[0], self.out_channels, x.shape[2], x.shape[3])
            and is_channels_last(x) == is_channels_last(other)
            and (x.is_contiguous() or is_channels_last(x))
            and (other.is_contiguous() or is_channels_last(other))
            and not other._is_view()
        ):
            return None
        pad, stride, dilation = list(self.padding), list(self.stride), list(self.dilation)
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            other, x, self.weight, self.bias, pad, stride, dilation, self.groups, "add", 1.0, None, [], None
        )

    def _onednn_inference(self, *tensors: torch.Tensor) -> bool:
        """What both oneDNN paths need: not "off", CPU float32 strided tensors (the weight and `tensors`), nothing
        that autograd must see, no graph capture, oneDNN on."""
        every = (self.weight, *tensors)
        return (
            self.prepack != "off"
            and all(
                t.device.type == "cpu" and t.dtype == torch.float32 and t.layout == torch.strided
                for t in every
            )
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in every))
            and not _capturing()
            and _mkldnn_ready()
        )

    def _packable(self, x: torch.Tensor) -> bool:
        return (
            self._onednn_inference(x)
            and self.kernel_size == (3, 3)
            and self.groups == 1
            and self.padding_mode == "zeros"
            and isinstance(self.padding, tuple)
            and min(self.in_channels, self.out_channels) >= 16
            and x.ndim == 4
            and x.shape[-2] * x.shape[-1] <= PACKED_MAX_PIXELS
            # made under inference_mode: no version counter to notice in-place edits
            and not self.weight.is_inference()
        )

    def _pack(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        pad, stride, dilation = list(self.padding), list(self.stride), list(self.dilation)
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
            w.detach().to_mkldnn(), pad, stride, dilation, 1, list(x.shape)
        )
        if self.prepack == "auto" and release_weight_pages(self) < w.numel() * w.element_size() // 2:
            return None  # not file-backed: a packed copy would add memory; stay on the plain path
        return packed


def set_conv_prepacking(module: nn.Module, mode: Prepack) -> int:
    """Set `prepack` on every lcmkit `Conv2d` inside `module`; returns how many there are."""
    if mode not in PREPACK_MODES:
        raise ValueError(f"conv prepacking mode {mode!r} is not one of {PREPACK_MODES}")
    count = 0
    for layer in module.modules():
        if isinstance(layer, Conv2d):
            layer.prepack = mode
            count += 1
    return count
