"""The conditional UNet of Stable Diffusion 1.x / 2.x and its LCM distillations (diffusers `UNet2DConditionModel`).

Attribute names are the diffusers checkpoint keys (`conv_in`, `time_embedding.cond_proj`,
`down_blocks.i.attentions.j.transformer_blocks.k.attn2.to_q`, ...), so a diffusers folder loads strictly with
no renaming. Which levels have cross-attention is data in `UNetConfig`, not a choice of block class.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lcmkit.config import ConfigError, UNetConfig
from lcmkit.models.base import ModelMixin
from lcmkit.models.ip_adapter import project_image_embeds
from lcmkit.nn import Downsample2D, ResnetBlock2D, TimestepEmbedding, Upsample2D, timestep_features
from lcmkit.nn.attention import ImageContext
from lcmkit.nn.freeu import apply_freeu
from lcmkit.nn.lora import scale_lora
from lcmkit.nn.paths import apply_fast_paths
from lcmkit.nn.transformer import SpatialTransformer
from lcmkit.runtime import FastPaths

logger = logging.getLogger(__name__)


@dataclass
class UNet2DConditionOutput:
    """The predicted noise (or v / x0, per the scheduler's `prediction_type`), shape of the input sample."""

    sample: torch.Tensor

    def __getitem__(self, key: int | str) -> torch.Tensor:
        """`out[0]` and `out["sample"]` work as on diffusers' output objects."""
        if key in (0, "sample"):
            return self.sample
        raise KeyError(f"UNet2DConditionOutput has only `sample` (index 0), not {key!r}")


class Timesteps(nn.Module):
    """Sinusoidal timestep features (no weights; diffusers' `time_proj`), always float32."""

    def __init__(self, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> None:
        super().__init__()
        self.dim, self.flip_sin_to_cos, self.freq_shift = dim, flip_sin_to_cos, freq_shift

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_features(t, self.dim, self.flip_sin_to_cos, self.freq_shift)


def time_embed_dim(config: UNetConfig) -> int:
    return config.time_embedding_dim or 4 * config.block_out_channels[0]


def _resnet(config: UNetConfig, c_in: int, c_out: int, output_scale_factor: float = 1.0) -> ResnetBlock2D:
    return ResnetBlock2D(
        c_in,
        c_out,
        temb_channels=time_embed_dim(config),
        groups=config.norm_num_groups,
        eps=config.norm_eps,
        dropout=config.dropout,
        output_scale_factor=output_scale_factor,
    )


def _transformer(config: UNetConfig, channels: int, heads: int, num_layers: int) -> SpatialTransformer:
    # diffusers' blocks use `channels // heads` as the head width, so inner_dim may round below `channels`.
    return SpatialTransformer(
        channels,
        heads=heads,
        dim_head=channels // heads,
        context_dim=config.cross_attention_dim,
        num_layers=num_layers,
        groups=config.norm_num_groups,
        use_linear_projection=config.use_linear_projection,
        upcast_attention=config.upcast_attention,
    )


class DownBlock(nn.Module):
    """Encoder level `level`: `layers_per_block` resnets (each followed by a transformer when the level has
    attention), then a stride-2 downsampler unless it is the deepest level. Every output is kept as a skip."""

    def __init__(self, config: UNetConfig, level: int) -> None:
        super().__init__()
        channels = config.block_out_channels
        c_in, c_out = channels[max(level - 1, 0)], channels[level]
        n = config.layers_per_block[level]
        self.resnets = nn.ModuleList([_resnet(config, c_in if j == 0 else c_out, c_out) for j in range(n)])
        self.attentions = None
        if config.down_attention[level]:
            heads, depth = config.heads[level], config.transformer_layers_per_block[level]
            self.attentions = nn.ModuleList([_transformer(config, c_out, heads, depth) for _ in range(n)])
        self.downsamplers = None
        if level < len(channels) - 1:
            self.downsamplers = nn.ModuleList([Downsample2D(c_out, padding=config.downsample_padding)])

    def forward(
        self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions is not None:
                h = self.attentions[j](h, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """Bottleneck: resnet -> transformer -> resnet at the deepest level (diffusers `UNetMidBlock2DCrossAttn`)."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        c = config.block_out_channels[-1]
        scale = config.mid_block_scale_factor
        self.resnets = nn.ModuleList([_resnet(config, c, c, scale), _resnet(config, c, c, scale)])
        self.attentions = nn.ModuleList(
            [_transformer(config, c, config.heads[-1], config.transformer_layers_per_block[-1])]
        )

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](h, temb)
        return self.resnets[1](self.attentions[0](h, context), temb)


class UpBlock(nn.Module):
    """Decoder stage `index` (0 = deepest): `layers_per_block + 1` resnets, each taking the backbone features
    concatenated with one skip popped from the encoder, optionally a transformer after each, then a 2x
    upsampler unless it is the last stage.

    `s1, s2, b1, b2` are the FreeU factors (None = off); `resolution_idx` picks which pair applies.
    """

    def __init__(self, config: UNetConfig, index: int) -> None:
        super().__init__()
        channels = tuple(reversed(config.block_out_channels))
        n_levels = len(channels)
        level = n_levels - 1 - index  # the encoder level this stage mirrors
        c_prev, c_out = channels[max(index - 1, 0)], channels[index]
        c_skip_last = channels[min(index + 1, n_levels - 1)]  # the previous level's downsampler output
        n = config.layers_per_block[level] + 1
        self.resolution_idx = index
        self.resnets = nn.ModuleList(
            [
                _resnet(
                    config,
                    (c_prev if j == 0 else c_out) + (c_skip_last if j == n - 1 else c_out),
                    c_out,
                )
                for j in range(n)
            ]
        )
        self.attentions = None
        if config.up_attention[index]:
            heads, depth = config.heads[level], config.transformer_layers_per_block[level]
            self.attentions = nn.ModuleList([_transformer(config, c_out, heads, depth) for _ in range(n)])
        # sub-pixel form where it pays ("auto": inputs of 32x32 and more, FastPaths.unet_subpixel)
        self.upsamplers = (
            nn.ModuleList([Upsample2D(c_out, subpixel="auto")]) if index < n_levels - 1 else None
        )
        self.s1: float | None = None
        self.s2: float | None = None
        self.b1: float | None = None
        self.b2: float | None = None

    def forward(
        self,
        h: torch.Tensor,
        skips: list[torch.Tensor],
        temb: torch.Tensor,
        context: torch.Tensor,
        upsample_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        # Truthiness, as in diffusers: a factor of 0 (or None) turns FreeU off for this block.
        freeu = bool(self.s1 and self.s2 and self.b1 and self.b2)
        for j, resnet in enumerate(self.resnets):
            skip = skips[-1 - j]  # the most recent encoder output first
            if freeu:
                h, skip = apply_freeu(self.resolution_idx, h, skip, self.s1, self.s2, self.b1, self.b2)
            h = resnet(torch.cat([h, skip], dim=1), temb)
            if self.attentions is not None:
                h = self.attentions[j](h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, upsample_size)
        return h


def _add_residuals(skips: list[torch.Tensor], residuals: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each skip connection plus its ControlNet residual (diffusers' `down_block_additional_residuals`)."""
    if len(residuals) != len(skips):
        raise ValueError(
            f"down_block_additional_residuals has {len(residuals)} tensors; this UNet has {len(skips)} skip "
            "connections (is the ControlNet built for another UNet?)"
        )
    return [skip + residual for skip, residual in zip(skips, residuals, strict=True)]


class TimeConditioned(ModelMixin):
    """What the UNet and the ControlNet share: `temb` from the timestep (and the LCM w-embedding) through their
    `time_proj` and `time_embedding` modules."""

    time_proj: Timesteps
    time_embedding: TimestepEmbedding

    def time_features(
        self, sample: torch.Tensor, timestep: torch.Tensor | float | int, timestep_cond: torch.Tensor | None
    ) -> torch.Tensor:
        """`temb` = MLP(sinusoid(t) + cond_proj(w_emb)), one row per sample in the batch."""
        batch = sample.shape[0]
        if not torch.is_tensor(timestep):
            dtype = torch.float32 if isinstance(timestep, float) else torch.int64
            timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
        elif timestep.ndim == 0:
            timestep = timestep[None].to(sample.device)
        if timestep.ndim != 1 or timestep.shape[0] not in (1, batch):
            raise ValueError(
                f"timestep must be a number, a 0-d tensor, or a 1-d tensor of length 1 or batch size {batch}; "
                f"got shape {tuple(timestep.shape)}"
            )
        t_emb = self.time_proj(timestep.to(sample.device).expand(batch))
        t_emb = t_emb.to(sample.dtype)  # the sinusoid is float32; the MLP runs in the model's dtype
        if timestep_cond is not None:
            timestep_cond = timestep_cond.to(t_emb.dtype)
        return self.time_embedding(t_emb, timestep_cond)


class UNet2DConditionModel(TimeConditioned):
    """eps/v-prediction UNet conditioned on a timestep, text embeddings and (for LCM) a guidance embedding.

    The LCM w-embedding (`timestep_cond`) is added to the sinusoidal timestep features through
    `time_embedding.cond_proj` before the time MLP (the w-conditioned consistency function of Luo et al. 2023,
    arXiv:2310.04378).
    """

    config_class = UNetConfig

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        if not config.mid_attention:
            raise ConfigError(
                "UNetConfig.mid_attention=False is not supported: the mid block always has attention"
            )
        self.config = config
        c0 = config.block_out_channels[0]
        n_levels = len(config.block_out_channels)
        self.conv_in = nn.Conv2d(config.in_channels, c0, kernel_size=3, padding=1)
        self.time_proj = Timesteps(c0, config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(c0, time_embed_dim(config), config.time_cond_proj_dim)
        self.down_blocks = nn.ModuleList([DownBlock(config, i) for i in range(n_levels)])
        self.mid_block = MidBlock(config)
        self.up_blocks = nn.ModuleList([UpBlock(config, i) for i in range(n_levels)])
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, c0, eps=config.norm_eps)
        self.conv_out = nn.Conv2d(c0, config.out_channels, kernel_size=3, padding=1)
        # an IP-Adapter's image projection (lcmkit.loading.ip_adapter installs it and the attn2 `to_k_ip`/`to_v_ip`)
        self.image_proj: nn.Module | None = None
        self.fast_paths = FastPaths.default()
        self.set_fast_paths(self.fast_paths)

    def set_fast_paths(self, paths: FastPaths) -> None:
        """Which fast paths the UNet's layers take (`lcmkit.runtime.FastPaths`: the conv, resnet, transformer
        fields and `unet_subpixel`; the VAE's and the pipeline's fields do not concern it)."""
        apply_fast_paths(self, paths, paths.unet_subpixel)
        self.fast_paths = paths

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """Turn FreeU on for every up block (Si et al. 2023, arXiv:2309.11497): skip factors s1, s2 and backbone factors b1, b2.

        Recommended values: SD1.5 (0.9, 0.2, 1.5, 1.6), SD2.1 (0.9, 0.2, 1.4, 1.6).
        As in diffusers, a factor of 0 disables FreeU; we log that instead of staying silent.
        """
        if not (s1 and s2 and b1 and b2):
            logger.warning(
                "enable_freeu(s1=%s, s2=%s, b1=%s, b2=%s): a zero factor leaves FreeU off", s1, s2, b1, b2
            )
        for block in self.up_blocks:
            block.s1, block.s2, block.b1, block.b2 = s1, s2, b1, b2

    def disable_freeu(self) -> None:
        """Turn FreeU off: the factors on every up block become None."""
        for block in self.up_blocks:
            block.s1 = block.s2 = block.b1 = block.b2 = None

    def enable_subpixel_upsampling(self) -> None:
        """`FastPaths.unet_subpixel = "auto"` (the default): sub-pixel upsampling on inputs of at least 32x32."""
        self.set_fast_paths(replace(self.fast_paths, unet_subpixel="auto"))

    def disable_subpixel_upsampling(self) -> None:
        """`FastPaths.unet_subpixel = "off"`: upsample exactly as the reference does (nearest 2x, then the conv)."""
        self.set_fast_paths(replace(self.fast_paths, unet_subpixel="off"))

    def cross_context(
        self, encoder_hidden_states: torch.Tensor, added_cond_kwargs: dict[str, Any] | None
    ) -> torch.Tensor | ImageContext:
        """What the cross-attentions read: the text embeddings, plus the image tokens when an IP-Adapter is loaded."""
        if self.image_proj is None:
            return encoder_hidden_states
        if "image_embeds" not in (added_cond_kwargs or {}):
            raise ValueError(
                "an IP-Adapter is loaded: pass added_cond_kwargs={'image_embeds': [...]} (the pipelines do, from "
                "ip_adapter_image= or ip_adapter_image_embeds=), or unload the adapter"
            )
        tokens = project_image_embeds(self.image_proj, added_cond_kwargs["image_embeds"])
        if tokens.shape[0] != encoder_hidden_states.shape[0]:
            raise ValueError(
                f"image_embeds has {tokens.shape[0]} rows but encoder_hidden_states {encoder_hidden_states.shape[0]}: "
                "give one row of image embeddings per sample in the UNet batch"
            )
        return ImageContext(encoder_hidden_states, tokens.to(encoder_hidden_states.dtype))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        *,
        timestep_cond: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, Any] | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        """Predict the model output for latents `sample` (B, C, H, W) at `timestep`.

        `encoder_hidden_states` (B, L, cross_attention_dim) are the text embeddings; `timestep_cond`
        (B, time_cond_proj_dim) is the LCM guidance embedding. Of `cross_attention_kwargs` only `"scale"` is
        read: it multiplies every LoRA adapter for this call. With an IP-Adapter loaded, `added_cond_kwargs`
        must hold `"image_embeds"` (as diffusers passes them, see `project_image_embeds`). H and W need not be
        multiples of 2**(levels-1).

        `down_block_additional_residuals` (one per skip connection, in encoder order) and
        `mid_block_additional_residual` are a ControlNet's outputs: added to the skips and to the mid block's
        output, as in diffusers.
        """
        lora_scale = (cross_attention_kwargs or {}).get("scale", 1.0)
        if lora_scale != 1.0:
            with scale_lora(self, lora_scale):
                return self.forward(
                    sample,
                    timestep,
                    encoder_hidden_states,
                    timestep_cond=timestep_cond,
                    added_cond_kwargs=added_cond_kwargs,
                    down_block_additional_residuals=down_block_additional_residuals,
                    mid_block_additional_residual=mid_block_additional_residual,
                    return_dict=return_dict,
                )
        temb = self.time_features(sample, timestep, timestep_cond)
        context = self.cross_context(encoder_hidden_states, added_cond_kwargs)

        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context)
            skips.extend(block_skips)
        if down_block_additional_residuals is not None:
            skips = _add_residuals(skips, down_block_additional_residuals)

        h = self.mid_block(h, temb, context)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual

        # When H or W is not a multiple of the total down factor, the encoder rounded sizes up; each upsampler
        # must then produce exactly the size of the skip it will be concatenated with, not simply 2x.
        factor = 2 ** (len(self.up_blocks) - 1)
        odd = any(d % factor for d in sample.shape[-2:])
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[-2:]) if odd and skips else None
            h = block(h, block_skips, temb, context, size)

        h = self.conv_out(F.silu(self.conv_norm_out(h)))
        if not return_dict:
            return (h,)
        return UNet2DConditionOutput(sample=h)
