"""ControlNet (Zhang, Rao & Agrawala 2023, arXiv:2302.05543) for SD 1.x / 2.x UNets (diffusers `ControlNetModel`).

A trainable copy of the UNet's encoder and mid block reads the latents plus an encoded control image (edges, depth,
pose, ...); 1x1 "zero" convolutions turn each skip connection and the mid block's output into residuals that the
UNet adds to its own (`UNet2DConditionModel(..., down_block_additional_residuals=, mid_block_additional_residual=)`).

The encoder and mid block are the UNet's own blocks (`lcmkit.models.unet`); attribute names are the diffusers
checkpoint keys (`controlnet_cond_embedding.blocks.0`, `controlnet_down_blocks.3`, `controlnet_mid_block`), so a
diffusers folder loads strictly with no renaming. Original single files are translated in `lcmkit.loading.controlnet`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lcmkit.config import ConfigError, ControlNetConfig
from lcmkit.models.unet import DownBlock, MidBlock, TimeConditioned, Timesteps, time_embed_dim
from lcmkit.nn import TimestepEmbedding
from lcmkit.nn.paths import apply_fast_paths
from lcmkit.runtime import FastPaths


@dataclass
class ControlNetOutput:
    """The residuals for the UNet's skip connections (encoder order) and for its mid block, already scaled."""

    down_block_res_samples: list[torch.Tensor]
    mid_block_res_sample: torch.Tensor

    def __iter__(self):  # `down, mid = controlnet(...)` works as with diffusers' tuple output
        return iter((self.down_block_res_samples, self.mid_block_res_sample))


class ControlNetConditioningEmbedding(nn.Module):
    """The hint encoder: control image (B, conditioning_channels, H, W) in [0, 1] -> features at latent size.

    `conv_in`, then per width step a 3x3 conv and a stride-2 3x3 conv (SiLU after each), then `conv_out` to the
    UNet's first width (zero-initialised when trained).
    """

    def __init__(self, out_channels: int, in_channels: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        blocks = []
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))
            blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=2))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(channels[-1], out_channels, kernel_size=3, padding=1)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(cond))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)


class ControlNetModel(TimeConditioned):
    """The ControlNet: residuals for the UNet from latents, timestep, text embeddings and a control image.

    Build it from a `ControlNetConfig`; load it with `ControlNetModel.from_pretrained(folder)` (a diffusers folder)
    or, for hub ids and original single files, `lcmkit.loading.controlnet.load_controlnet` (also exported as
    `lcmkit.ControlNetModel`, whose `from_pretrained` and `from_single_file` take them).
    """

    config_class = ControlNetConfig

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__()
        if not isinstance(config, ControlNetConfig):
            raise ConfigError(f"ControlNetModel needs a ControlNetConfig, got {type(config).__name__}")
        self.config = config
        self.name_or_path: str | None = None  # where it was loaded from: named by the errors that refuse it
        channels = config.block_out_channels
        c0 = channels[0]
        self.conv_in = nn.Conv2d(config.in_channels, c0, kernel_size=3, padding=1)
        self.time_proj = Timesteps(c0, config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(c0, time_embed_dim(config), config.time_cond_proj_dim)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            c0, config.conditioning_channels, config.conditioning_embedding_out_channels
        )
        self.down_blocks = nn.ModuleList([DownBlock(config, i) for i in range(len(channels))])
        self.mid_block = MidBlock(config)
        # one zero convolution per skip connection, in the order the UNet keeps them
        zero = [c0]
        for level, c in enumerate(channels):
            zero += [c] * config.layers_per_block[level] + ([c] if level < len(channels) - 1 else [])
        self.controlnet_down_blocks = nn.ModuleList([nn.Conv2d(c, c, kernel_size=1) for c in zero])
        self.controlnet_mid_block = nn.Conv2d(channels[-1], channels[-1], kernel_size=1)
        self.fast_paths = FastPaths.default()
        self.set_fast_paths(self.fast_paths)

    def set_fast_paths(self, paths: FastPaths) -> None:
        """The UNet's fast paths (conv, resnet, transformer fields) for the blocks the ControlNet shares with it."""
        apply_fast_paths(self, paths, paths.unet_subpixel)
        self.fast_paths = paths

    @property
    def num_residuals(self) -> int:
        """How many skip-connection residuals it returns (the UNet must have as many skips)."""
        return len(self.controlnet_down_blocks)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        *,
        timestep_cond: torch.Tensor | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ) -> ControlNetOutput | tuple[list[torch.Tensor], torch.Tensor]:
        """Residuals for latents `sample` (B, C, h, w) at `timestep` under `encoder_hidden_states`, steered by
        `controlnet_cond` (B, conditioning_channels, 8h, 8w) in [0, 1]; every residual is multiplied by
        `conditioning_scale`. `timestep_cond` is read only by a ControlNet with a w-embedding input
        (`config.time_cond_proj_dim`). Guess mode is not implemented (`guess_mode=True` raises)."""
        if guess_mode:
            raise ValueError("guess_mode=True is not supported by lcmkit's ControlNet; use guess_mode=False")
        if self.config.conditioning_channel_order == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        if self.time_embedding.cond_proj is None:
            timestep_cond = None
        temb = self.time_features(sample, timestep, timestep_cond)
        context = encoder_hidden_states

        h = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context)
            skips.extend(block_skips)
        h = self.mid_block(h, temb, context)

        down = [
            conv(skip) * conditioning_scale
            for conv, skip in zip(self.controlnet_down_blocks, skips, strict=True)
        ]
        mid = self.controlnet_mid_block(h) * conditioning_scale
        if self.config.global_pool_conditions:
            down = [d.mean(dim=(2, 3), keepdim=True) for d in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        if not return_dict:
            return down, mid
        return ControlNetOutput(down, mid)
