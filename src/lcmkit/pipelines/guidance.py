"""What the UNet sees each step: the prompt embeddings, the LCM w-embedding, and classifier-free guidance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


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
) -> torch.Tensor:
    """The UNet's raw prediction at (x_t, t, w, c); with a negative, classifier-free guidance
    eps_u + s (eps_c - eps_u) (Ho & Salimans 2022), both branches as one UNet batch. `image_embeds` (IP-Adapter)
    reach the UNet as `added_cond_kwargs`, only when given (the OpenVINO UNet takes no such argument)."""
    extra: dict[str, Any] = (
        {} if image_embeds is None else {"added_cond_kwargs": {"image_embeds": image_embeds}}
    )
    if negative_embeds is None:
        return unet(
            x_t,
            t,
            timestep_cond=w_embedding,
            encoder_hidden_states=prompt_embeds,
            cross_attention_kwargs=cross_attention_kwargs,
            return_dict=False,
            **extra,
        )[0]
    pred = unet(
        torch.cat([x_t, x_t]),
        t,
        timestep_cond=None if w_embedding is None else torch.cat([w_embedding, w_embedding]),
        encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds]),
        cross_attention_kwargs=cross_attention_kwargs,
        return_dict=False,
        **extra,
    )[0]
    uncond, cond = pred.chunk(2)
    return uncond + cfg_scale * (cond - uncond)
