"""The Stable Diffusion VAE (`AutoencoderKL`): encoder, decoder, the latent Gaussian, and tiled/sliced running.

Module attribute names are the diffusers checkpoint keys (`encoder.down_blocks.0.resnets.0.conv1.weight`,
`decoder.mid_block.attentions.0.to_q.weight`, `post_quant_conv.weight`, ...), so a diffusers `vae/` folder loads
with `strict=True` and no renaming.

Tiling follows the reference exactly (same tile grid, same linear blend ramps, same in-place blend order and crop),
so tiled outputs match diffusers' tiled outputs, not merely look alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lcmkit.config import VAEConfig
from lcmkit.models.base import ModelMixin, SlicingTilingMixin
from lcmkit.nn import Attention, Downsample2D, ResnetBlock2D, Upsample2D
from lcmkit.nn.layout import MemoryFormat, check_memory_format, level_layout
from lcmkit.nn.paths import apply_fast_paths
from lcmkit.runtime import FastPaths
from lcmkit.schedulers.randn import randn_like_reference

logger = logging.getLogger(__name__)

# Every norm in the SD VAE (resnets, mid attention, output norms) uses this epsilon, not torch's 1e-5.
_EPS = 1e-6


# ----------------------------------------------------------------------------------------------------------------------
# Outputs and the latent distribution


class TupleLike:
    """Lets `out[0]` and `out.field` both work, as with diffusers' output objects."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f) for f in self.__dataclass_fields__)  # type: ignore[attr-defined]

    def __getitem__(self, index: int | str) -> Any:
        return getattr(self, index) if isinstance(index, str) else self.to_tuple()[index]


@dataclass
class AutoencoderKLOutput(TupleLike):
    latent_dist: DiagonalGaussianDistribution


@dataclass
class DecoderOutput(TupleLike):
    sample: torch.Tensor


class DiagonalGaussianDistribution:
    """q(z|x) = N(mean, exp(logvar)) with the mean and log-variance stacked on the channel axis.

    `logvar` is clamped to [-30, 20] so that `std = exp(logvar / 2)` neither underflows to 0 nor overflows.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return self.std if self.deterministic else torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """z = mean + std * eps, with eps drawn exactly as the reference draws it (same generator, same bits)."""
        eps = randn_like_reference(
            self.mean.shape, generator=generator, device=self.parameters.device, dtype=self.parameters.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) per sample, summed over C, H, W; `other=None` means the standard normal."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var
            + self.var / other.var
            - 1.0
            - self.logvar
            + other.logvar,
            dim=[1, 2, 3],
        )


# ----------------------------------------------------------------------------------------------------------------------
# Blocks


def _resnet_chain(in_channels: int, out_channels: int, layers: int, groups: int) -> nn.ModuleList:
    """`layers` VAE resnets (no time embedding); the first maps in_channels -> out_channels."""
    return nn.ModuleList(
        ResnetBlock2D(
            in_channels if i == 0 else out_channels, out_channels, temb_channels=None, groups=groups, eps=_EPS
        )
        for i in range(layers)
    )


class DownEncoderBlock(nn.Module):
    """`layers` resnets, then (except at the deepest level) a stride-2 conv with the VAE's right/bottom padding."""

    def __init__(
        self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool
    ) -> None:
        super().__init__()
        self.resnets = _resnet_chain(in_channels, out_channels, layers, groups)
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock(nn.Module):
    """`layers` resnets, then (except at the last, full-resolution level) nearest 2x upsampling and a conv."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool) -> None:
        super().__init__()
        self.resnets = _resnet_chain(in_channels, out_channels, layers, groups)
        # sub-pixel form (FastPaths.vae_subpixel): nearest 2x + conv up to float rounding, 16 instead of 36 MACs
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, subpixel=True)]) if upsample else None

    def forward(
        self, x: torch.Tensor, before_upsampling: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """`before_upsampling` (the decoder's layout change for the next level) is applied to the map the
        upsampler gets, four times smaller than its output."""
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            if before_upsampling is not None:
                x = before_upsampling(x)
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """resnet -> (single-head spatial self-attention) -> resnet at the lowest resolution.

    The attention has one head whose width is the channel count, a GroupNorm on its input, biased projections
    and a residual connection. Without attention `attentions` is empty, so the checkpoint has no attention keys.
    """

    def __init__(self, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.attentions = nn.ModuleList(
            [
                Attention(
                    channels,
                    heads=1,
                    dim_head=channels,
                    bias=True,
                    upcast=False,  # the reference's default (SDPA) processor runs in the input dtype
                    norm_groups=groups,
                    norm_eps=_EPS,
                    residual=True,
                )
            ]
            if attention
            else []
        )
        self.resnets = nn.ModuleList(
            ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=_EPS) for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2 * latent_channels, H / f, W / f), f = 2 ** (levels - 1)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        channels = config.block_out_channels
        groups = config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock(
                channels[max(i - 1, 0)], c, config.layers_per_block, groups, downsample=i < len(channels) - 1
            )
            for i, c in enumerate(channels)
        )
        self.mid_block = MidBlock(channels[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)
        self.memory_format: MemoryFormat = "auto"  # FastPaths.vae_memory_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.memory_format
        x = self.conv_in(level_layout(mode, x, self.down_blocks[0].resnets[0].conv1))
        for block in self.down_blocks:
            # the layout each level's convolutions run fastest in (lcmkit.nn.layout); changed after a downsampler,
            # where the map is four times smaller than before it
            x = block(level_layout(mode, x, block.resnets[0].conv1))
        x = self.mid_block(level_layout(mode, x, self.mid_block.resnets[0].conv1))
        return self.conv_out(F.silu(self.conv_norm_out(x))).contiguous()


class Decoder(nn.Module):
    """Latents (B, latent_channels, h, w) -> image (B, out_channels, h * f, w * f).

    The up path mirrors the encoder (deepest level first) with one resnet more per level than the encoder.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        channels = tuple(reversed(config.block_out_channels))
        groups = config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], groups, config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock(
                channels[max(i - 1, 0)],
                c,
                config.layers_per_block + 1,
                groups,
                upsample=i < len(channels) - 1,
            )
            for i, c in enumerate(channels)
        )
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)
        self.memory_format: MemoryFormat = "auto"  # FastPaths.vae_memory_format

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        mode = self.memory_format
        x = self.mid_block(self.conv_in(level_layout(mode, z, self.mid_block.resnets[0].conv1)))
        for i, block in enumerate(self.up_blocks):
            # each level in the layout its convolutions run fastest in (lcmkit.nn.layout); where the next level's
            # differs, the change is made before the upsampler, on the smaller map
            x = level_layout(mode, x, block.resnets[0].conv1)
            after = self.up_blocks[i + 1] if i + 1 < len(self.up_blocks) else None
            relayout = (
                None if after is None else partial(level_layout, mode, conv=after.resnets[0].conv1, scale=2)
            )
            x = block(x, relayout)
        return self.conv_out(F.silu(self.conv_norm_out(x))).contiguous()


# ----------------------------------------------------------------------------------------------------------------------
# Tiling helpers


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Cross-fade the last `extent` rows (dim=2) or columns (dim=3) of `a` into the first ones of `b`, in place.

    b[k] = a[-e + k] * (1 - k / e) + b[k] * (k / e) for k < e, e = min(a.size, b.size, extent).
    The ramp is computed in float64 and each product rounded to the tensor's dtype before the sum, which is what
    the reference's per-row loop with Python-float weights does, so the result is bit-identical, only vectorised.
    """
    e = min(a.shape[dim], b.shape[dim], extent)
    if e <= 0:
        return b
    ramp = torch.arange(e, dtype=torch.float64, device=b.device) / e
    # Python-float weights act as float32 on float32/half tensors (op math) and as float64 on float64 tensors.
    weight_dtype = torch.float64 if b.dtype == torch.float64 else torch.float32
    shape = [1] * b.ndim
    shape[dim] = e
    w_b = ramp.to(weight_dtype).view(shape)
    w_a = (1.0 - ramp).to(weight_dtype).view(shape)
    head = b.narrow(dim, 0, e)
    tail = a.narrow(dim, a.shape[dim] - e, e)
    blended = (tail.to(weight_dtype) * w_a).to(b.dtype) + (head.to(weight_dtype) * w_b).to(b.dtype)
    head.copy_(blended)
    return b


# ----------------------------------------------------------------------------------------------------------------------
# The model


class AutoencoderKL(SlicingTilingMixin, ModelMixin):
    """The SD VAE: `encode(x).latent_dist` gives q(z|x); `decode(z).sample` gives the image in [-1, 1].

    `enable_slicing()` runs a batch one sample at a time; `enable_tiling()` runs large inputs as overlapping tiles
    (`tile_sample_min_size` pixels / `tile_latent_min_size` latents, overlap `tile_overlap_factor`) blended
    together, which bounds memory at the cost of small seams. Both settings are plain attributes a user may change.
    """

    config_class = VAEConfig

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # each resnet block's input is the previous layer's output, read by that block alone
        for module in (*self.encoder.modules(), *self.decoder.modules()):
            if isinstance(module, ResnetBlock2D):
                module.sum_into_input = True
        c = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else None

        self.use_slicing = False
        self.use_tiling = False
        self.tile_sample_min_size: int = config.sample_size
        self.tile_latent_min_size: int = int(config.sample_size / self.vae_scale_factor)
        self.tile_overlap_factor: float = 0.25
        self.fast_paths = FastPaths.default()
        self.set_fast_paths(self.fast_paths)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side: one 2x downsampling per level except the deepest."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    # -- switches (slicing and tiling come from SlicingTilingMixin) -----------------------------------------------

    def set_fast_paths(self, paths: FastPaths) -> None:
        """Which fast paths the encoder and decoder take (`lcmkit.runtime.FastPaths`: the conv and resnet fields,
        `vae_memory_format` and `vae_subpixel`). Inputs and outputs stay plain NCHW in every layout."""
        apply_fast_paths(self, paths, paths.vae_subpixel)
        self.encoder.memory_format = paths.vae_memory_format
        self.decoder.memory_format = paths.vae_memory_format
        self.fast_paths = paths

    def enable_subpixel_upsampling(self) -> None:
        """`FastPaths.vae_subpixel = "always"` (the default): the decoder's upsamplers in sub-pixel form."""
        self.set_fast_paths(replace(self.fast_paths, vae_subpixel="always"))

    def disable_subpixel_upsampling(self) -> None:
        """`FastPaths.vae_subpixel = "off"`: upsample exactly as the reference does (nearest 2x, then the conv)."""
        self.set_fast_paths(replace(self.fast_paths, vae_subpixel="off"))

    def set_memory_format(self, mode: MemoryFormat) -> None:
        """`FastPaths.vae_memory_format = mode`: "auto" (the default) runs channels-last on the CPU in float32
        except where a level takes the Winograd path; "channels_last" / "contiguous" force one layout everywhere
        ("channels_last" needs `conv_winograd="off"`: Winograd runs on NCHW maps only). Results agree with the
        reference to float rounding (about 1e-5 on the SD decoder's output)."""
        self.set_fast_paths(replace(self.fast_paths, vae_memory_format=check_memory_format(mode)))

    def blend_v(self, a: torch.Tensor, b: torch.Tensor, blend_extent: int) -> torch.Tensor:
        """Blend the bottom of tile `a` into the top of tile `b` (the tile below it); modifies `b` in place."""
        return _blend(a, b, blend_extent, dim=2)

    def blend_h(self, a: torch.Tensor, b: torch.Tensor, blend_extent: int) -> torch.Tensor:
        """Blend the right edge of tile `a` into the left edge of tile `b` (the tile to its right); in place."""
        return _blend(a, b, blend_extent, dim=3)

    # -- encode ------------------------------------------------------------------------------------------------------

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> moments (mean and log-variance stacked on channels)."""
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return self._tiled_encode(x)
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def encode(
        self, x: torch.Tensor, return_dict: bool = True
    ) -> AutoencoderKLOutput | tuple[DiagonalGaussianDistribution]:
        """Encode images in [-1, 1] of shape (B, C, H, W) into the posterior q(z|x)."""
        if x.ndim != 4:
            raise ValueError(
                f"AutoencoderKL.encode expects (batch, channels, height, width), got {tuple(x.shape)}"
            )
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode(part) for part in x.split(1)])
        else:
            moments = self._encode(x)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def _tiled_encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encode overlapping pixel tiles one at a time and blend their moments (8 channels for SD)."""
        stride = int(self.tile_sample_min_size * (1 - self.tile_overlap_factor))
        blend_extent = int(self.tile_latent_min_size * self.tile_overlap_factor)
        row_limit = self.tile_latent_min_size - blend_extent

        def encode_tile(tile: torch.Tensor) -> torch.Tensor:
            h = self.encoder(tile)
            return self.quant_conv(h) if self.quant_conv is not None else h

        return self._tiled(x, self.tile_sample_min_size, stride, blend_extent, row_limit, encode_tile)

    def tiled_encode(
        self, x: torch.Tensor, return_dict: bool = True
    ) -> AutoencoderKLOutput | tuple[DiagonalGaussianDistribution]:
        """Tiled encoding regardless of the input size (the reference's public method)."""
        posterior = DiagonalGaussianDistribution(self._tiled_encode(x))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    # -- decode ------------------------------------------------------------------------------------------------------

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            return self._tiled_decode(z)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode(
        self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """Decode unscaled latents (divide by `config.scaling_factor` first) into images in about [-1, 1].

        `generator` is accepted for signature compatibility with the reference and unused (decoding is deterministic).
        """
        if z.ndim != 4:
            raise ValueError(
                f"AutoencoderKL.decode expects (batch, channels, height, width), got {tuple(z.shape)}"
            )
        if self.use_slicing and z.shape[0] > 1:
            image = torch.cat([self._decode(part) for part in z.split(1)])
        else:
            image = self._decode(z)
        return DecoderOutput(sample=image) if return_dict else (image,)

    def _tiled_decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode overlapping latent tiles one at a time and blend the decoded pixels."""
        stride = int(self.tile_latent_min_size * (1 - self.tile_overlap_factor))
        blend_extent = int(self.tile_sample_min_size * self.tile_overlap_factor)
        row_limit = self.tile_sample_min_size - blend_extent

        def decode_tile(tile: torch.Tensor) -> torch.Tensor:
            if self.post_quant_conv is not None:
                tile = self.post_quant_conv(tile)
            return self.decoder(tile)

        return self._tiled(z, self.tile_latent_min_size, stride, blend_extent, row_limit, decode_tile)

    def tiled_decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """Tiled decoding regardless of the latent size (the reference's public method)."""
        image = self._tiled_decode(z)
        return DecoderOutput(sample=image) if return_dict else (image,)

    def _tiled(
        self,
        x: torch.Tensor,
        tile: int,
        stride: int,
        blend_extent: int,
        row_limit: int,
        run: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Run `run` on `tile`-sized windows every `stride` along H and W; blend and crop the outputs.

        Tiles are computed one at a time and only the previous row of outputs is kept. The reference first computes
        all tiles and then blends; since blending never feeds back into a tile's computation, interleaving gives
        the same result, provided each tile is blended in the same order: with the (already blended) tile above,
        then with the (already blended) tile to its left, both in place. Each output is then cropped to
        `row_limit` and the crops are concatenated, rows along W, then along H.
        """
        if tile < 1 or stride < 1:
            raise ValueError(
                f"tiling needs a tile size >= 1 and a stride >= 1, got tile={tile}, stride={stride} "
                f"(tile_sample_min_size={self.tile_sample_min_size}, "
                f"tile_latent_min_size={self.tile_latent_min_size}, tile_overlap_factor={self.tile_overlap_factor})"
            )
        height, width = x.shape[-2:]
        above: list[torch.Tensor] = []
        result_rows = []
        for i in range(0, height, stride):
            row: list[torch.Tensor] = []
            crops = []
            for j in range(0, width, stride):
                out = run(x[:, :, i : i + tile, j : j + tile])
                if above:
                    out = self.blend_v(above[len(row)], out, blend_extent)
                if row:
                    out = self.blend_h(row[-1], out, blend_extent)
                row.append(out)
                crops.append(out[:, :, :row_limit, :row_limit])
            result_rows.append(torch.cat(crops, dim=3))
            above = row
        logger.debug(
            "tiled run: %d x %d tiles of %d over %s", len(result_rows), len(above), tile, tuple(x.shape)
        )
        return torch.cat(result_rows, dim=2)

    # -- forward -----------------------------------------------------------------------------------------------------

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """Reconstruct: encode, take the posterior's mode (or a sample with `generator`), decode."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        image = self.decode(z).sample
        return DecoderOutput(sample=image) if return_dict else (image,)
