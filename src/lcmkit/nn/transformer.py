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
from lcmkit.nn.conv import capturing_graph
from lcmkit.nn.lora import LoraLayer
from lcmkit.nn.resnet import forward_hooked


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

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        direct = x.dtype in (torch.float32, torch.float64) and not capturing_graph()
        if not (direct and _plain(self.proj_in) and _plain(self.proj_out)):
            return self._forward_through_modules(x, context)
        # proj_in and proj_out as matrix products on the map's memory: a 1x1 conv over the map is a linear layer
        # over its tokens, and the (B, C, HW) map read transposed IS the (B, HW, C) token matrix, so neither the
        # tokens nor the map is copied into the other layout (SD1.5 at 512x512: 4.75 -> 4.55 s a UNet call on a
        # 2-core AVX-512 VM); the residual is summed into the out-projection's product. Same values up to rounding
        # in float32; half precision keeps the reference's order of roundings (bias, then residual), and captured
        # graphs (OpenVINO, ONNX) keep the reference's layers. LoRA adapters on the projections add their low-rank
        # products on top, as their layer would.
        b, c, height, width = x.shape
        normed = self.norm(x)
        layer = self.proj_in
        h = F.linear(normed.flatten(2).transpose(1, 2), _matrix(layer), layer.bias)
        for name, coeff in _adapters(layer):
            if layer.is_conv:
                delta = layer.lora_path(normed, name).flatten(2).transpose(1, 2)
            else:
                delta = layer.lora_path(normed.flatten(2).transpose(1, 2), name)
            h = h + delta * coeff
        for block in self.transformer_blocks:
            h = block(h, context)
        layer = self.proj_out
        w_out = _matrix(layer)
        out = torch.baddbmm(x.flatten(2), w_out.expand(b, *w_out.shape), h.transpose(1, 2))
        if layer.bias is not None:
            out = out.add_(layer.bias[:, None])
        for name, coeff in _adapters(layer):
            if layer.is_conv:
                delta = layer.lora_path(h.transpose(1, 2).reshape(b, -1, height, width), name).flatten(2)
            else:
                delta = layer.lora_path(h, name).transpose(1, 2)
            out = out + delta * coeff
        return out.view(b, c, height, width)

    def _forward_through_modules(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Calling proj_in and proj_out as modules: in half precision, in captured graphs, and for projections that
        forward hooks watch."""
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


def _plain(module: nn.Module) -> bool:
    """A torch Linear or 1x1 Conv2d, itself or inside a LoRA wrapper, that no forward hook watches."""
    base = module.base if isinstance(module, LoraLayer) else module
    return type(base) in (nn.Linear, nn.Conv2d) and not forward_hooked(module) and not forward_hooked(base)


def _adapters(module: nn.Module) -> list[tuple[str, float]]:
    """The LoRA adapters a wrapped projection adds this call, with their coefficients."""
    return list(module.coefficients().items()) if isinstance(module, LoraLayer) else []


def _matrix(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight matrix of a Linear or a 1x1 conv (a LoRA wrapper holds the current, maybe fused, one)."""
    return module.weight.reshape(module.weight.shape[0], -1)
