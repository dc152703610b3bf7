"""The fast variants of the layers: the same functions as their reference forwards, computed faster on the CPU.

Each layer's `forward` reads like the reference (diffusers' layer) and hands over to one function here where its
fast path is on (`lcmkit.runtime.FastPaths`, applied by `lcmkit.nn.paths.apply_fast_paths`). A function returns None
where its path does not apply to this call (autograd, another dtype or device, a graph being captured, a forward
hook that must see the reference's tensors), and the layer then runs the reference arithmetic (`resnet_block`
instead falls back inside itself: under autograd it is the reference sum). Every check of graph capture and hooks
lives here. `docs/performance.md` has what each path measured.

- Convolutions (`conv2d`, `conv2d_add_into`): 3x3 convolutions on small maps use a weight pre-packed in oneDNN's
  blocked layout, so oneDNN does not reorder it on every call (outputs agree to float rounding, about 1e-6
  relative). The packed copy is extra memory, so with `prepack = "auto"` only weights whose pages are file-backed
  (a memory-mapped safetensors file) are packed, and those pages are handed back to the OS (`lcmkit.io.paging`).
  Large 3x3 convolutions with many channels on plain NCHW maps take NNPACK's Winograd F(6x6, 3x3) transform
  (`torch._nnpack_spatial_convolution`, built into PyTorch's CPU wheels), about a fifth of the multiplies of a
  direct convolution; it rounds differently (about 1e-5 relative to the output's scale) and runs one sample at a
  time (its batched routine is tuned for training). `conv2d_add_into` sums a convolution straight into a residual.
- Resnet blocks (`resnet_block`): the SiLUs and adds reuse the tensors the block just made, and the second
  convolution writes into the residual: the same sums, fewer fresh activations (page faults on large maps).
- Upsamplers (`upsample_subpixel`): nearest 2x then a 3x3 conv, computed on the small map (`lcmkit.nn.fast_upsample`).
- Spatial transformers (`spatial_transformer`): the 1x1 in/out projections as matrix products on the map's memory.

Where a path is "auto", whether it runs for a shape is either measured on this machine the first time a layer meets
the shape (`choose = "probe"` on the layer, from `FastPaths.choose`: `lcmkit.nn.probe`), within the `PROBE_*`
regions below, or read off the fixed thresholds (`choose = "thresholds"`, and wherever nothing can be timed: graph
capture, autograd, another device or dtype, or a probe already running). Outside the probe regions no path runs
in "auto" mode; each region contains its threshold's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from lcmkit.io.paging import release_weight_pages
from lcmkit.nn import probe
from lcmkit.nn.fast_upsample import nearest2x_conv3x3, subpixel_kernels
from lcmkit.nn.layout import is_channels_last
from lcmkit.nn.lora import LoraLayer
from lcmkit.nn.probe import default_prober

# The Winograd path ("auto") where it measured faster than oneDNN in either layout: large maps, many channels
WINOGRAD_MIN_PIXELS = 96 * 96
WINOGRAD_MIN_CHANNELS = 256
# Packing pays where the weight is large next to the activations (the UNet's 32x32 and smaller levels)
PACKED_MAX_PIXELS = 32 * 32
# The sub-pixel upsampler ("auto") from this input size: its four phase kernels are 16/9 the size of the 3x3
# weight, which dominates small maps
SUBPIXEL_MIN_PIXELS = 32 * 32

# Where `choose = "probe"` measures (elsewhere the path does not run in "auto" mode): packing up to 64x64 pixels;
# Winograd from 32x32 pixels and 128 channels; the sub-pixel upsampler and a level's layout at every size
PROBE_PACKED_MAX_PIXELS = 64 * 64
PROBE_WINOGRAD_MIN_PIXELS = 32 * 32
PROBE_WINOGRAD_MIN_CHANNELS = 128


# ----------------------------------------------------------------------------------------------------------------------
# When a fast path may run


def capturing_graph() -> bool:
    """Traced, scripted, compiled or exported: graphs (OpenVINO, ONNX, inductor) get the reference layers."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()


def forward_hooked(module: nn.Module) -> bool:
    """Forward hooks that could see (or expect to see) this module's input or output: its own or global ones."""
    return bool(
        module._forward_pre_hooks
        or module._forward_hooks
        or torch_module._global_forward_pre_hooks
        or torch_module._global_forward_hooks
    )


def winograd_available() -> bool:
    """NNPACK built in, initialised on this CPU (x86-64 with AVX2, or ARM with NEON) and not turned off through
    `torch.backends.nnpack`."""
    return torch.backends.nnpack.is_available() and torch._C._get_nnpack_enabled()


def probing(layer: nn.Module, *tensors: torch.Tensor) -> bool:
    """Whether `layer` chooses its "auto" paths by measuring here: `choose = "probe"`, CPU float32 inference
    (`tensors` and the layer's weight), no graph capture, and no probe running already (a probe times the
    reference with its layers on the thresholds, so it never starts another)."""
    weight = getattr(layer, "weight", None)
    return (
        getattr(layer, "choose", "thresholds") == "probe"
        and weight is not None
        and _cpu_float32_inference(weight, *tensors)
        and not default_prober().busy
    )


def _probe_input(shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """A random map to time a convolution on, only as tall as a probe times (`lcmkit.nn.probe.FIRST_ROWS`), from
    its own generator (the global RNG is left alone)."""
    b, c, h, w = shape
    rows = min(h, probe.FIRST_ROWS)
    return torch.empty(b, c, rows, w).normal_(generator=torch.Generator().manual_seed(0))


def _layout_name(x: torch.Tensor) -> str:
    return "channels_last" if is_channels_last(x) else "nchw"


def _mkldnn_ready() -> bool:
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def _cpu_float32_inference(weight: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """CPU float32 strided tensors, nothing that autograd must see, no graph capture."""
    every = (weight, *tensors)
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 and t.layout == torch.strided for t in every)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in every))
        and not capturing_graph()
    )


class DerivedWeight:
    """A tensor made from a weight (a packed copy, sub-pixel kernels), cached until the weight is replaced, cast,
    moved or changed in place (its version counter); dropped, not copied, when the module is copied or pickled.
    A change made through `.data` bypasses the version counter and is not seen, as with any cached derived tensor."""

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

    def clear(self) -> None:
        """Forget the derived tensor (made again on the next `get`)."""
        self.source, self.key, self.value = None, None, None

    def __deepcopy__(self, memo: dict) -> DerivedWeight:
        return DerivedWeight()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


# ----------------------------------------------------------------------------------------------------------------------
# Convolutions (lcmkit.nn.conv.Conv2d: `prepack` and `winograd` attributes)


def conv2d(conv: nn.Conv2d, x: torch.Tensor, packed: DerivedWeight) -> torch.Tensor | None:
    """`conv(x)` on the Winograd path or with a packed weight (cached in `packed`); None where neither applies."""
    if _winograd_applies(conv, x):
        return _winograd(conv, x)
    if not _packable(conv, x):
        return None
    weight = packed.get(conv.weight, lambda w: _pack(conv, w, x), conv.prepack)
    if weight is None:
        return None
    if probing(conv, x) and not _packing_pays(conv, x, weight):
        return None  # measured slower here (or too slow to measure, and above the threshold)
    return _packed_conv(conv, x, weight)


def _packed_conv(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    pad, stride, dilation = list(conv.padding), list(conv.stride), list(conv.dilation)
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight, conv.bias, pad, stride, dilation, 1, "none", [], ""
    )


def _packing_pays(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Probed: the packed weight against `nn.Conv2d`'s convolution, on this input's shape and layout."""
    key = (
        f"prepack conv{conv.kernel_size[0]}x{conv.kernel_size[1]}/{conv.stride[0]} {conv.in_channels}->"
        f"{conv.out_channels} {'x'.join(map(str, x.shape))} {_layout_name(x)}"
    )
    plain = (lambda t: nn.Conv2d.forward(conv, t), x)
    pays = default_prober().decide(key, plain, (lambda t: _packed_conv(conv, t, weight), x))
    return x.shape[-2] * x.shape[-1] <= PACKED_MAX_PIXELS if pays is None else pays


def conv2d_add_into(conv: nn.Conv2d, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor | None:
    """`other += conv(x)` in place, as one oneDNN convolution with a sum post-op, and return `other`; or None
    (nothing done) where that does not apply: same-size convolutions (`other` has x's batch and pixels) on inputs
    larger than `PACKED_MAX_PIXELS`, on the CPU in float32 without autograd, with `prepack` not "off". Writing the
    convolution straight into the residual saves a fresh activation and a pass of the add; bitwise the same as
    `other + conv(x)` in our tests."""
    if _winograd_applies(conv, x):
        return None  # the Winograd convolution is faster than this fused direct one
    if not (
        _onednn_inference(conv, x, other)
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
        and x.ndim == 4
        and x.shape[-2] * x.shape[-1] > PACKED_MAX_PIXELS
        and other.shape == (x.shape[0], conv.out_channels, x.shape[2], x.shape[3])
        and is_channels_last(x) == is_channels_last(other)
        and (x.is_contiguous() or is_channels_last(x))
        and (other.is_contiguous() or is_channels_last(other))
        and not other._is_view()
    ):
        return None
    pad, stride, dilation = list(conv.padding), list(conv.stride), list(conv.dilation)
    return torch.ops.mkldnn._convolution_pointwise_.binary(
        other, x, conv.weight, conv.bias, pad, stride, dilation, conv.groups, "add", 1.0, None, [], None
    )


def takes_winograd(
    conv: nn.Conv2d,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype,
    device: torch.device,
    alternative: str = "nchw",
) -> bool:
    """Whether a plain NCHW input of this shape, dtype and device would take the Winograd path (autograd aside):
    what a network asks when it picks the layout of a level (`lcmkit.nn.layout`). Never while a graph is captured.
    With `choose = "probe"` it is measured against oneDNN's convolution on `alternative` ("nchw" or
    "channels_last": the layout the layer would run otherwise)."""
    if conv.winograd == "off" or capturing_graph() or len(shape) != 4 or not _winograd_shape(conv):
        return False
    cpu_float32 = device.type == "cpu" and dtype == torch.float32
    if not (cpu_float32 and conv.weight.device.type == "cpu" and conv.weight.dtype == torch.float32):
        return False
    if shape[2] * shape[3] == 0 or not winograd_available():
        return False
    if conv.winograd == "always":
        return True
    pixels, channels = shape[2] * shape[3], min(conv.in_channels, conv.out_channels)
    if probing(conv):
        if pixels < PROBE_WINOGRAD_MIN_PIXELS or channels < PROBE_WINOGRAD_MIN_CHANNELS:
            return False
        pays = _winograd_pays(conv, shape, alternative)
        if pays is not None:
            return pays
    return pixels >= WINOGRAD_MIN_PIXELS and channels >= WINOGRAD_MIN_CHANNELS


def _winograd_pays(conv: nn.Conv2d, shape: tuple[int, ...] | torch.Size, alternative: str) -> bool | None:
    """Probed: NNPACK's Winograd convolution on NCHW against oneDNN's on `alternative`, on a random map (None:
    too slow to probe)."""
    x = _probe_input(shape)
    other = x.contiguous(memory_format=torch.channels_last) if alternative == "channels_last" else x
    key = f"winograd {conv.in_channels}->{conv.out_channels} {'x'.join(map(str, shape))} vs {alternative}"
    direct = (lambda t: nn.Conv2d.forward(conv, t), other)
    return default_prober().decide(key, direct, (lambda t: _winograd(conv, t), x))


def prefers_channels_last(conv: nn.Conv2d, shape: tuple[int, ...] | torch.Size) -> bool | None:
    """Probed: whether oneDNN runs `conv` faster on a channels-last map of this (NCHW) shape than on a plain one;
    None where `conv` does not probe (`choose = "thresholds"`, autograd, graph capture, not CPU float32) or a call
    was too slow to probe."""
    if len(shape) != 4 or conv.kernel_size != (3, 3) or not probing(conv):
        return None
    x = _probe_input(shape)
    key = f"channels_last conv3x3 {conv.in_channels}->{conv.out_channels} {'x'.join(map(str, shape))}"
    nchw = (lambda t: nn.Conv2d.forward(conv, t), x)
    nhwc = (lambda t: nn.Conv2d.forward(conv, t), x.contiguous(memory_format=torch.channels_last))
    return default_prober().decide(key, nchw, nhwc)


def _winograd_shape(conv: nn.Conv2d) -> bool:
    return (
        conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def _winograd_applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    return (
        x.ndim == 4
        and x.is_contiguous()
        and takes_winograd(conv, x.shape, x.dtype, x.device)
        and _cpu_float32_inference(conv.weight, x)
    )


def _winograd(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """NNPACK's Winograd convolution, one sample at a time."""
    if x.shape[0] == 1:
        return torch._nnpack_spatial_convolution(x, conv.weight, conv.bias, [1, 1], [1, 1])
    out = x.new_empty(x.shape[0], conv.out_channels, x.shape[2], x.shape[3])
    for i in range(x.shape[0]):
        out[i : i + 1] = torch._nnpack_spatial_convolution(
            x[i : i + 1], conv.weight, conv.bias, [1, 1], [1, 1]
        )
    return out


def _onednn_inference(conv: nn.Conv2d, *tensors: torch.Tensor) -> bool:
    """What both oneDNN paths need: `prepack` not "off", CPU float32 inference, oneDNN on."""
    return conv.prepack != "off" and _cpu_float32_inference(conv.weight, *tensors) and _mkldnn_ready()


def _packable(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    return (
        _onednn_inference(conv, x)
        and conv.kernel_size == (3, 3)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
        and min(conv.in_channels, conv.out_channels) >= 16
        and x.ndim == 4
        and x.shape[-2] * x.shape[-1] <= (PROBE_PACKED_MAX_PIXELS if probing(conv, x) else PACKED_MAX_PIXELS)
        # made under inference_mode: no version counter to notice in-place edits
        and not conv.weight.is_inference()
    )


def _pack(conv: nn.Conv2d, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
    pad, stride, dilation = list(conv.padding), list(conv.stride), list(conv.dilation)
    packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
        w.detach().to_mkldnn(), pad, stride, dilation, 1, list(x.shape)
    )
    if conv.prepack == "auto" and release_weight_pages(conv) < w.numel() * w.element_size() // 2:
        return None  # not file-backed: a packed copy would add memory; stay on the plain path
    return packed


# ----------------------------------------------------------------------------------------------------------------------
# Resnet blocks (lcmkit.nn.resnet.ResnetBlock2D)


def resnet_block(block: nn.Module, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
    """`ResnetBlock2D`'s reference sum, without autograd, reusing the tensors the block makes.

    `inplace_activations`: the SiLUs and adds run in place on tensors this block just made (not while a hook on a
    norm may keep its output). `residual_into_conv`: conv2 writes `x + conv2(h)` straight into x where the block
    owns x (the shortcut's fresh output, or the block's input when `sum_into_input` says nothing reads it again).
    Addition is commutative in floating point, so every order here gives the reference's bits.
    """
    # in-place writes would break autograd, and a hook on a norm may keep its input or output
    free = not torch.is_grad_enabled() and not (block.norm1._forward_hooks or block.norm2._forward_hooks)
    reuse = free and block.inplace_activations
    h = block.conv1(F.silu(block.norm1(x), inplace=reuse))
    if block.time_emb_proj is not None and temb is not None:
        step = block.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = h.add_(step) if reuse else h + step
    h = block.dropout(F.silu(block.norm2(h), inplace=reuse))
    if block.conv_shortcut is not None:
        x = block.conv_shortcut(x)  # a fresh tensor: ours to write into, unless a hook kept it
        owned = not forward_hooked(block.conv_shortcut)
    else:
        owned = block.sum_into_input and not forward_hooked(block)
    # lcmkit's Conv2d has `add_into`; a plain nn.Conv2d, or a LoRA wrapper (whose adapters add their own path), not
    add_into = getattr(type(block.conv2), "add_into", None)
    fuse = (
        free
        and block.residual_into_conv
        and owned
        and add_into is not None
        and not forward_hooked(block.conv2)
    )
    out = add_into(block.conv2, h, x) if fuse else None  # x + conv2(h), written into x
    if out is None:
        h = block.conv2(h)
        out = h.add_(x) if reuse else x + h
    if block.output_scale_factor != 1.0:
        out = out.div_(block.output_scale_factor) if reuse else out / block.output_scale_factor
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Upsamplers (lcmkit.nn.sampling.Upsample2D: a `subpixel` attribute, True / False / "auto")


def upsample_subpixel(
    mode: bool | str, conv: nn.Conv2d, x: torch.Tensor, kernels: DerivedWeight
) -> torch.Tensor | None:
    """`conv(nearest_2x(x))` in sub-pixel form where `mode` takes it (True; "auto": where it measured faster on
    this shape with the conv's `choose = "probe"`, else inputs of at least `SUBPIXEL_MIN_PIXELS` pixels), else
    None. Never while a graph is captured, whatever the mode: traced, the interleave of the four phases becomes
    strided scatters (OpenVINO's CPU plugin ran SD1.5's decoder, bf16, 2 threads, in 0.66 s against the plain
    graph's 0.43 at 256x256, 2.9 s against 2.0 at 512x512; fp32 the same either way). The phase kernels are cached in `kernels`, except under autograd and for
    weights made under `inference_mode` (no version counter). `conv` may be a LoRA wrapper (`LoraLayer`): its
    `weight` is the base one (with any fused adapters), and each unfused adapter's product is added, computed in
    sub-pixel form too, as the wrapper's forward would add it on the upsampled map."""
    if not mode or capturing_graph():
        return None
    w = conv.weight
    fresh = (torch.is_grad_enabled() and w.requires_grad) or w.is_inference()

    def phases() -> torch.Tensor:
        return subpixel_kernels(w) if fresh else kernels.get(w, subpixel_kernels)

    def subpixel_conv(t: torch.Tensor) -> torch.Tensor:
        out = nearest2x_conv3x3(t, w, conv.bias, kernels=phases())
        for name, coeff in _adapters(conv):
            out = out + _lora_subpixel(conv, t, name) * coeff
        return out

    if mode == "auto" and probing(conv, x):
        key = f"subpixel {conv.in_channels}->{conv.out_channels} {'x'.join(map(str, x.shape))} {_layout_name(x)}"
        plain = (lambda t: conv(F.interpolate(t, scale_factor=2.0, mode="nearest")), x)
        pays = default_prober().decide(key, plain, (subpixel_conv, x))
        if pays is None:
            pays = x.shape[-2] * x.shape[-1] >= SUBPIXEL_MIN_PIXELS
        if not pays:
            kernels.clear()  # the phase kernels (16/9 of the weight) are not kept where they do not pay
            return None
    elif mode == "auto" and x.shape[-2] * x.shape[-1] < SUBPIXEL_MIN_PIXELS:
        return None
    return subpixel_conv(x)


def _lora_subpixel(layer: LoraLayer, x: torch.Tensor, name: str) -> torch.Tensor:
    """`layer.lora_path(nearest_2x(x), name)` for the upsampler's 3x3 conv: the adapter's down conv (the base's 3x3
    kernel) in sub-pixel form on x, then its 1x1 up conv."""
    return F.conv2d(nearest2x_conv3x3(x, layer.lora_down[name]), layer.lora_up[name])


# ----------------------------------------------------------------------------------------------------------------------
# Spatial transformers (lcmkit.nn.transformer.SpatialTransformer)


def spatial_transformer(st: nn.Module, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor | None:
    """`SpatialTransformer`'s forward with proj_in and proj_out as matrix products on the map's memory, or None in
    half precision, in captured graphs and for projections that forward hooks watch.

    A 1x1 conv over the map is a linear layer over its tokens, and the (B, C, HW) map read transposed IS the
    (B, HW, C) token matrix, so neither the tokens nor the map is copied into the other layout; the residual is
    summed into the out-projection's product. Same values up to rounding in float32. LoRA adapters on the
    projections add their low-rank products on top, as their layer would.
    """
    if x.dtype not in (torch.float32, torch.float64) or capturing_graph():
        return None
    if not (_plain(st.proj_in) and _plain(st.proj_out)):
        return None
    b, c, height, width = x.shape
    normed = st.norm(x)
    layer = st.proj_in
    h = F.linear(normed.flatten(2).transpose(1, 2), _matrix(layer), layer.bias)
    for name, coeff in _adapters(layer):
        if layer.is_conv:
            delta = layer.lora_path(normed, name).flatten(2).transpose(1, 2)
        else:
            delta = layer.lora_path(normed.flatten(2).transpose(1, 2), name)
        h = h + delta * coeff
    for block in st.transformer_blocks:
        h = block(h, context)
    layer = st.proj_out
    w_out = _matrix(layer)
    out = torch.baddbmm(x.flatten(2), w_out.expand(b, *w_out.shape), h.transpose(1, 2))
    if layer.bias is not None:
        out = out.add_(layer.bias[:, None])
    for name, coeff in _adapters(layer):
        if layer.is_conv:
            delta = layer.lora_path(h.transpose(1, 2).reshape(b, -1, height, width), name).flatten(2)
        else:
            delta = layer.lora_path(h, name).transpose(1, 2)
        out = out + delta * coeff
    return out.view(b, c, height, width)


def _plain(module: nn.Module) -> bool:
    """A torch Linear or 1x1 Conv2d, itself or inside a LoRA wrapper, that no forward hook watches."""
    base = module.base if isinstance(module, LoraLayer) else module
    return type(base) in (nn.Linear, nn.Conv2d) and not forward_hooked(module) and not forward_hooked(base)


def _adapters(module: nn.Module) -> list[tuple[str, float]]:
    """The LoRA adapters a wrapped projection adds this call, with their coefficients."""
    return list(module.coefficients().items()) if isinstance(module, LoraLayer) else []


def _matrix(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight matrix of a Linear or a 1x1 conv (a LoRA wrapper holds the current, maybe fused, one)."""
    return module.weight.reshape(module.weight.shape[0], -1)
