"""`Conv2d` whose no-grad CPU float32 forward uses a weight pre-packed in oneDNN's blocked layout.

`F.conv2d` on CPU hands oneDNN a plain (O, I, kH, kW) weight, which oneDNN reorders into its blocked layout on every
call. For the UNet's deep levels that reorder is a large part of the work: a 1280-channel 3x3 weight is 59 MB, while
the convolution at 8x8 latents is under 2 GFLOP (SD1.5 at 512x512: 57 ms plain against 20 ms packed, 16x16: 97 against
67 ms, on a 2-core AVX-512 VM). Packing once per weight removes it; the arithmetic is oneDNN's either way (the outputs
agree to float rounding, about 1e-6 relative).

The packed copy is extra memory, so by default (`prepack = "auto"`) a weight is packed only when its own pages are
file-backed (a memory-mapped safetensors file): right after packing, those pages are handed back to the OS
(`lcmkit.io.paging`), so the layer costs no memory. In-memory weights (a fused LoRA, a converted single-file
checkpoint, anything cast or trained) keep the plain path unless `prepack = "always"`; `"off"` never packs (and
turns off `add_into`, a convolution summed straight into a residual).
The packed copy is remade when the weight is replaced, cast or moved, or changed in place (its version counter);
a change made through `.data` bypasses that counter and is not seen, as with any cached derived tensor.

Large 3x3 convolutions on plain NCHW maps take a Winograd path instead (`winograd = "auto"`): NNPACK's F(6x6, 3x3)
transform, built into PyTorch's CPU wheels (`torch._nnpack_spatial_convolution`), does about a fifth of the
multiplies of a direct convolution. Measured on a 2-core AVX-512 VM against oneDNN (ms, NNPACK / oneDNN NCHW /
oneDNN channels-last): 512 ch at 128x128 248 / 388 / 371, at 96x96 136 / 216 / 219, 256 ch at 256x256 288 / 422 /
323, 320 ch at 128x128 106 / 151 / 122, 640 -> 320 at 96x96 115 / 148 / 142; it loses where the weight is large
next to the map (512 ch at 64x64 88 / 81, 1280 ch at 16x16 167 / 56) and at 128 channels (128 at 512x512 405 /
490 / 342). Hence `WINOGRAD_MIN_PIXELS` and `WINOGRAD_MIN_CHANNELS`. Its rounding differs from a direct
convolution's: about 1e-5 relative to the output's scale (7e-5 on outputs of magnitude 7), against 3e-7 for oneDNN;
the SD decoder's output in [-1, 1] moves by about 4e-5. NNPACK needs plain NCHW input, which is why the VAE runs those levels
NCHW (`lcmkit.nn.layout`), and runs one sample at a time (its batched routine measured 4x slower).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from lcmkit.io.paging import release_weight_pages
from lcmkit.nn.layout import is_channels_last

Prepack = Literal["auto", "always", "off"]
PREPACK_MODES = ("auto", "always", "off")
Winograd = Literal["auto", "always", "off"]
WINOGRAD_MODES = ("auto", "always", "off")
# The Winograd path ("auto") where it measured faster than oneDNN in either layout (see the module docstring)
WINOGRAD_MIN_PIXELS = 96 * 96
WINOGRAD_MIN_CHANNELS = 256
# Packing pays where the weight is large next to the activations (the UNet's 32x32 and smaller levels); at 64x64 and
# above it measured the same or slower than the plain path (e.g. 512 channels at 128x128: 612 against 518 ms).
PACKED_MAX_PIXELS = 32 * 32


def _mkldnn_ready() -> bool:
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def winograd_available() -> bool:
    """NNPACK built in, initialised on this CPU (x86-64 with AVX2, or ARM with NEON) and not turned off through
    `torch.backends.nnpack`."""
    return torch.backends.nnpack.is_available() and torch._C._get_nnpack_enabled()


def capturing_graph() -> bool:
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
    of at most `PACKED_MAX_PIXELS` pixels, run on CPU in float32 with autograd off (or with nothing requiring grad).
    The Winograd path (`winograd`: "auto" by size, "always" at any size, "off") applies to 3x3, stride-1, padding-1,
    ungrouped, zero-padded convolutions on plain NCHW inputs under the same CPU/float32/no-autograd conditions; every
    other call is `nn.Conv2d`'s.
    """

    def __init__(self, *args, prepack: Prepack = "auto", winograd: Winograd = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.prepack: Prepack = prepack
        self.winograd: Winograd = winograd
        self._packed = DerivedWeight()  # value None: this weight stays on the plain path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._winograd_applies(x):
            return self._winograd(x)
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
        if self._winograd_applies(x):
            return None  # the Winograd convolution is faster than this fused direct one
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

    def takes_winograd(
        self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device
    ) -> bool:
        """Whether a plain NCHW input of this shape, dtype and device would take the Winograd path (autograd
        aside): what a network asks when it picks the layout of a level (`lcmkit.nn.layout`). Never while a graph
        is captured (traced, scripted, compiled, exported): graphs get the plain convolution."""
        if self.winograd == "off" or capturing_graph() or len(shape) != 4 or not self._winograd_shape():
            return False
        cpu_float32 = device.type == "cpu" and dtype == torch.float32
        if not (cpu_float32 and self.weight.device.type == "cpu" and self.weight.dtype == torch.float32):
            return False
        if shape[2] * shape[3] == 0 or not winograd_available():
            return False
        return self.winograd == "always" or (
            shape[2] * shape[3] >= WINOGRAD_MIN_PIXELS
            and min(self.in_channels, self.out_channels) >= WINOGRAD_MIN_CHANNELS
        )

    def _winograd_shape(self) -> bool:
        return (
            self.kernel_size == (3, 3)
            and self.stride == (1, 1)
            and self.padding == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
        )

    def _winograd_applies(self, x: torch.Tensor) -> bool:
        return (
            x.ndim == 4
            and x.is_contiguous()
            and self.takes_winograd(x.shape, x.dtype, x.device)
            and self._cpu_float32_inference(x)
        )

    def _winograd(self, x: torch.Tensor) -> torch.Tensor:
        """NNPACK's Winograd convolution, one sample at a time (its batched routine is tuned for training)."""
        if x.shape[0] == 1:
            return torch._nnpack_spatial_convolution(x, self.weight, self.bias, [1, 1], [1, 1])
        out = x.new_empty(x.shape[0], self.out_channels, x.shape[2], x.shape[3])
        for i in range(x.shape[0]):
            out[i : i + 1] = torch._nnpack_spatial_convolution(
                x[i : i + 1], self.weight, self.bias, [1, 1], [1, 1]
            )
        return out

    def _cpu_float32_inference(self, *tensors: torch.Tensor) -> bool:
        """CPU float32 strided tensors (the weight and `tensors`), nothing that autograd must see, no graph capture."""
        every = (self.weight, *tensors)
        return (
            all(
                t.device.type == "cpu" and t.dtype == torch.float32 and t.layout == torch.strided
                for t in every
            )
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in every))
            and not capturing_graph()
        )

    def _onednn_inference(self, *tensors: torch.Tensor) -> bool:
        """What both oneDNN paths need: not "off", CPU float32 inference (`_cpu_float32_inference`), oneDNN on."""
        return self.prepack != "off" and self._cpu_float32_inference(*tensors) and _mkldnn_ready()

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
        if isinstance(layer, Conv2d):
            setattr(layer, attribute, mode)
            count += 1
    return count
