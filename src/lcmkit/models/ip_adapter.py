"""IP-Adapter's image side (Ye et al. 2023, arXiv:2308.06721): the projections that turn a CLIP image embedding into
the tokens the UNet's decoupled cross-attentions read, and the CLIP vision encoder call.

Attribute names are those of the h94/IP-Adapter files' `image_proj.*` keys, so those weights load with no renaming:

- `ImageProjection` (`ip-adapter_sd15`): `proj` (Linear, CLIP image embedding -> num_tokens * cross_attention_dim),
  then `norm` (LayerNorm over each token);
- `Resampler` (`ip-adapter-plus_sd15`): a Perceiver resampler over the encoder's penultimate hidden states:
  learned `latents` queries, `proj_in`, `layers.N.0` (PerceiverAttention: `norm1`, `norm2`, `to_q`, `to_kv`,
  `to_out`) and `layers.N.1` (feed-forward: LayerNorm, Linear, GELU, Linear), then `proj_out` and `norm_out`.

The attention layers' `to_k_ip` / `to_v_ip` live on `lcmkit.nn.attention.Attention`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PERCEIVER_HEAD_DIM = 64  # the head width of every released resampler (the files do not store it)


class ImageProjection(nn.Module):
    """CLIP image embeddings (N, clip_dim) -> `num_tokens` image tokens (N, num_tokens, cross_attention_dim)."""

    uses_hidden_states = False  # reads the vision model's projected `image_embeds`

    def __init__(self, clip_dim: int, cross_attention_dim: int, num_tokens: int = 4) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_attention_dim = cross_attention_dim
        self.proj = nn.Linear(clip_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(embeds.to(self.proj.weight.dtype))
        return self.norm(tokens.reshape(embeds.shape[0], self.num_tokens, self.cross_attention_dim))


class PerceiverAttention(nn.Module):
    """The resampler's queries (`latents`) attend to the image features and to themselves: keys and values come
    from both, concatenated, through one `to_kv` projection."""

    def __init__(self, dim: int, heads: int, dim_head: int = PERCEIVER_HEAD_DIM) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (self._heads(t) for t in (self.to_q(latents), k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(latents.shape[0], -1, self.heads * self.dim_head))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], -1, self.heads, self.dim_head).transpose(1, 2)


def _feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """LayerNorm -> Linear -> GELU -> Linear, without biases; indices 0, 1, 3 hold the weights."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class Resampler(nn.Module):
    """Encoder hidden states (N, S, embed_dim) -> `num_tokens` image tokens (N, num_tokens, output_dim)."""

    uses_hidden_states = True  # reads the vision model's penultimate hidden states

    def __init__(
        self,
        embed_dim: int,
        hidden_dim: int,
        output_dim: int,
        depth: int,
        heads: int,
        num_tokens: int,
        ff_mult: int = 4,
    ) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_attention_dim = output_dim
        self.latents = nn.Parameter(torch.randn(1, num_tokens, hidden_dim) / hidden_dim**0.5)
        self.proj_in = nn.Linear(embed_dim, hidden_dim)
        self.proj_out = nn.Linear(hidden_dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            [
                nn.ModuleList([PerceiverAttention(hidden_dim, heads), _feed_forward(hidden_dim, ff_mult)])
                for _ in range(depth)
            ]
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(hidden_states.to(self.proj_in.weight.dtype))
        latents = self.latents.expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


def project_image_embeds(projection: nn.Module, image_embeds: Any) -> torch.Tensor:
    """Image tokens (B, N * T, C) for the UNet from `image_embeds` as diffusers passes them: a list with one
    tensor (one adapter) of shape (B, N, D) (N images per sample) or (B, N, S, D) (hidden states), or a bare tensor
    (B, D) / (B, S, D) for one image. The N images' tokens are concatenated, as diffusers' attention does."""
    if isinstance(image_embeds, (list, tuple)):
        if len(image_embeds) != 1:
            raise ValueError(
                f"image_embeds has {len(image_embeds)} entries; lcmkit holds one IP-Adapter at a time, so pass a "
                "list with one tensor"
            )
        embeds = image_embeds[0]
    else:
        embeds = image_embeds.unsqueeze(1)  # one image per sample
    per_image = 3 if projection.uses_hidden_states else 2  # (S, D) or (D,) per image, after (B, N)
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != per_image + 1:
        shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
        want = "(batch, images, tokens, dim)" if projection.uses_hidden_states else "(batch, images, dim)"
        raise ValueError(f"image_embeds for this IP-Adapter must be {want}, got {shape}")
    batch, images = embeds.shape[:2]
    tokens = projection(embeds.reshape(batch * images, *embeds.shape[2:]))
    return tokens.reshape(batch, images * tokens.shape[1], tokens.shape[2])


@torch.no_grad()
def encode_ip_image(
    image_encoder: nn.Module, pixel_values: torch.Tensor, hidden_states: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds, unconditional embeds) of preprocessed images (N, 3, S, S) from a transformers
    `CLIPVisionModelWithProjection`: the projected `image_embeds` (N, D) and zeros like them (what the plain
    adapter's negative side sees), or the penultimate hidden states (N, S', D') and those of an all-zero image
    (the plus adapter's negative side), as the reference pipelines compute them."""
    if not hidden_states:
        embeds = image_encoder(pixel_values).image_embeds
        return embeds, torch.zeros_like(embeds)
    embeds = image_encoder(pixel_values, output_hidden_states=True).hidden_states[-2]
    uncond = image_encoder(torch.zeros_like(pixel_values), output_hidden_states=True).hidden_states[-2]
    return embeds, uncond
