"""The one place that chooses the layers' fast variants: `apply_fast_paths` sets a `FastPaths` on every layer of a
model (the arithmetic of each variant is in `lcmkit.nn.fast`)."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from lcmkit.nn.conv import Conv2d
from lcmkit.nn.lora import LoraLayer
from lcmkit.nn.resnet import ResnetBlock2D
from lcmkit.nn.sampling import Upsample2D
from lcmkit.nn.transformer import SpatialTransformer
from lcmkit.runtime import FastPaths, Mode

# FastPaths' sub-pixel modes as `Upsample2D.subpixel` values
SUBPIXEL_SETTING: dict[str, bool | str] = {"auto": "auto", "always": True, "off": False}


def apply_fast_paths(module: nn.Module, paths: FastPaths, subpixel: Mode) -> None:
    """Set `paths` on every lcmkit layer inside `module`; its upsamplers take `subpixel` (the model's own field,
    `paths.unet_subpixel` or `paths.vae_subpixel`). Plain torch layers have no fast variant and are left alone."""
    if not isinstance(paths, FastPaths):
        raise TypeError(f"fast paths must be a lcmkit.runtime.FastPaths, got {type(paths).__name__}")
    for layer in _layers(module):
        if isinstance(layer, Conv2d):
            layer.prepack = paths.conv_prepack
            layer.winograd = paths.conv_winograd
            layer.choose = paths.choose
        elif isinstance(layer, ResnetBlock2D):
            layer.inplace_activations = paths.inplace_activations
            layer.residual_into_conv = paths.residual_into_conv
        elif isinstance(layer, SpatialTransformer):
            layer.fused_projections = paths.fused_projections
        elif isinstance(layer, Upsample2D):
            layer.subpixel = SUBPIXEL_SETTING[subpixel]


def _layers(module: nn.Module) -> Iterator[nn.Module]:
    """Every module inside `module`, and the base layer inside each LoRA wrapper (kept outside the module tree, so
    `modules()` does not reach it; it runs the conv's fast paths, `LoraLayer.forward`)."""
    for layer in module.modules():
        yield layer
        if isinstance(layer, LoraLayer):
            yield layer.base
