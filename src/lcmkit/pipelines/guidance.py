"""What the UNet sees each step: the prompt embeddings, the LCM w-embedding, and classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# (x, t, context, w_embedding) -> the ControlNet residuals for this UNet batch, or None (see pipelines/control.py)
Control = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    tuple[list[torch.Tensor], torch.Tensor] | None,
]


@dataclass
class Conditioning:
    """The text/guidance inputs of one call. `negative_embeds` is None unless classifier-free guidance runs.
    `image_embeds` (an IP-Adapter's image prompt, as `added_cond_kwargs["image_embeds"]`) already holds the
    unconditional rows first when guidance runs."""

    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None
    w_embedding: torch.Tensor | None
    cfg_scale: float
    image_embeds: list[torch.Tensor] | None = None


def guided_prediction(
    unet: torch.nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    w_embedding: torch.Tensor | None,
    cfg_scale: float,
    cross_attention_kwargs: dict | None,
    image_embeds: list[torch.Tensor] | None = None,
    control: Control | None = None,
) -> torch.Tensor:
    """The UNet's raw prediction at (x_t, t, w, c); with a negative, classifier-free guidance
    eps_u + s (eps_c - eps_u) (Ho & Salimans 2022), both branches as one UNet batch.

    `image_embeds` (IP-Adapter) reach the UNet as `added_cond_kwargs`, only when given (the OpenVINO UNet takes no
    such argument). `control` (a ControlNet run) sees the same batch as the UNet and returns the residuals the UNet
    adds."""
    extra: dict[str, Any] = (
        {} if image_embeds is None else {"added_cond_kwargs": {"image_embeds": image_embeds}}
    )
    if negative_embeds is None:
        return _unet(unet, x_t, t, prompt_embeds, w_embedding, cross_attention_kwargs, control, extra)
    pred = _unet(
        unet,
        torch.cat([x_t, x_t]),
        t,
        torch.cat([negative_embeds, prompt_embeds]),
        None if w_embedding is None else torch.cat([w_embedding, w_embedding]),
        cross_attention_kwargs,
        control,
        extra,
    )
    uncond, cond = pred.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def _unet(
    unet: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    w_embedding: torch.Tensor | None,
    cross_attention_kwargs: dict | None,
    control: Control | None,
    extra: dict[str, Any],
) -> torch.Tensor:
    residuals = control(x, t, context, w_embedding) if control is not None else None
    if residuals is not None:
        extra = {
            **extra,
            "down_block_additional_residuals": residuals[0],
            "mid_block_additional_residual": residuals[1],
        }
    return unet(
        x,
        t,
        timestep_cond=w_embedding,
        encoder_hidden_states=context,
        cross_attention_kwargs=cross_attention_kwargs,
        return_dict=False,
        **extra,
    )[0]
