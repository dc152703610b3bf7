"""Tiny ControlNets for the tests: diffusers builds them (seeded), every weight is then randomised (the zero
convolutions start at zero, which would hide any mistake behind residuals of 0), and they are saved as folders."""

from __future__ import annotations

from pathlib import Path

import torch

# Fits helpers.tiny_models.SD15 / SD15_PLAIN (the UNet's encoder layout; a 2-level VAE: 2 pixels per latent, so the
# hint encoder has one stride-2 step).
DIFFUSERS_SD15_CONTROLNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    cross_attention_dim=32,
    norm_num_groups=8,
    attention_head_dim=4,
    conditioning_embedding_out_channels=(8, 16),
)


def build_diffusers_controlnet(seed: int = 0, **changes) -> torch.nn.Module:
    """A diffusers ControlNetModel with every parameter random (N(0, 0.05) added to the initial values)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel(**{**DIFFUSERS_SD15_CONTROLNET, **changes}).eval()
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return net


def save_diffusers_controlnet(folder: Path, seed: int = 0, **changes) -> Path:
    build_diffusers_controlnet(seed, **changes).save_pretrained(folder)
    return folder
