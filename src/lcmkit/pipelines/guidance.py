"""What the UNet sees each step: the prompt embeddings, the LCM w-embedding, and classifier-free guidance."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """The text/guidance inputs of one call. `negative_embeds` is None unless classifier-free guidance runs."""

    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None
    w_embedding: torch.Tensor | None
    cfg_scale: float


def guided_prediction(
    unet: torch.nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    w_embedding: torch.Tensor | None,
    cfg_scale: float,
    cross_attention_kwargs: dict | None,
) -> torch.Tensor:
    """The UNet's raw prediction at (x_t, t, w, c); with a negative, classifier-free guidance
    eps_u + s (eps_c - eps_u) (Ho & Salimans 2022), both branches as one UNet batch."""
    if negative_embeds is None:
        return unet(
            x_t,
            t,
            timestep_cond=w_embedding,
            encoder_hidden_states=prompt_embeds,
            cross_attention_kwargs=cross_attention_kwargs,
            return_dict=False,
        )[0]
    pred = unet(
        torch.cat([x_t, x_t]),
        t,
        timestep_cond=None if w_embedding is None else torch.cat([w_embedding, w_embedding]),
        encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds]),
        cross_attention_kwargs=cross_attention_kwargs,
        return_dict=False,
    )[0]
    uncond, cond = pred.chunk(2)
    return uncond + cfg_scale * (cond - uncond)
