"""The UNet's spatial transformer (diffusers `Transformer2DModel` key layout, the Stable Diffusion 1.x/2.x case).

Feature maps become tokens, pass through pre-norm transformer blocks (self-attention, cross-attention to the
text embedding, GEGLU feed-forward), and return to feature maps with a residual connection around the whole.
Attribute names (`norm`, `proj_in`, `transformer_blocks.N.{norm1,attn1,norm2,attn2,norm3,ff.net.0.proj,ff.net.2}`,
`proj_out`) are the checkpoint keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lcmkit.nn.attention import Attention
from lcmkit.nn.fast import spatial_transformer


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection to 2x width, split into value and gate, `value * gelu(gate)`."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU -> dropout -> linear, stored as `net.0.proj` / `net.2` like the checkpoints."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-norm block: `x += attn1(norm1(x))`, `x += attn2(norm2(x), context)`, `x += ff(norm3(x))`."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        context_dim: int,
        upcast_attention: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, upcast=upcast_attention)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn2 = Attention(
            dim, context_dim=context_dim, heads=heads, dim_head=dim_head, upcast=upcast_attention
        )
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """GroupNorm -> `proj_in` -> transformer blocks over the H*W tokens -> `proj_out`, plus the input (residual).

    `use_linear_projection` (SD 2.x) makes `proj_in`/`proj_out` Linear layers applied to tokens; otherwise (SD 1.x)
    they are 1x1 convolutions applied to the feature map. `inner_dim = heads * dim_head`.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        context_dim: int,
        num_layers: int = 1,
        groups: int = 32,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)
        if use_linear_projection:
            self.proj_in = nn.Linear(channels, inner)
            self.proj_out = nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, kernel_size=1)
            self.proj_out = nn.Conv2d(inner, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [
                TransformerBlock(inner, heads, dim_head, context_dim, upcast_attention=upcast_attention)
                for _ in range(num_layers)
            ]
        )
        # FastPaths.fused_projections: proj_in/proj_out as matrix products on the map (lcmkit.nn.fast)
        self.fused_projections = True

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.fused_projections:
            out = spatial_transformer(self, x, context)  # None where it does not apply (lcmkit.nn.fast)
            if out is not None:
                return out
        b, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear_projection:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(b, height * width, h.shape[1])
        if self.use_linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear_projection:
            h = self.proj_out(h)
        h = h.reshape(b, height, width, h.shape[-1]).permute(0, 3, 1, 2).contiguous()
        if not self.use_linear_projection:
            h = self.proj_out(h)
        return h + x
