"""Multi-head attention with the diffusers `Attention` key layout (`to_q`, `to_k`, `to_v`, `to_out.0`), and the
decoupled cross-attention of IP-Adapter (Ye et al. 2023, arXiv:2308.06721): `to_k_ip` / `to_v_ip` on image tokens."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lcmkit.nn.layout import is_channels_last


class ImageContext(NamedTuple):
    """What a cross-attention attends to when an IP-Adapter is in use: the text embeddings (B, L, C) and the
    image tokens (B, T, C) that the adapter's image projection made. The UNet builds it from `image_embeds`; it
    travels through the blocks in place of the text embeddings, and only `Attention` looks inside."""

    text: torch.Tensor
    image: torch.Tensor


class Attention(nn.Module):
    """Scaled dot-product attention over tokens, optionally cross-attending to `context`.

    The VAE's spatial self-attention uses `norm_groups` (a GroupNorm on the input, stored as `group_norm`)
    and `residual=True`, and accepts NCHW feature maps; the UNet's transformer blocks pass (B, L, C) tokens.

    IP-Adapter: `to_k_ip` / `to_v_ip` (None until an adapter is loaded, `lcmkit.loading.ip_adapter`) project the
    image tokens of an `ImageContext`, and the output is `attn(q, k_text, v_text) + ip_scale * attn(q, k_img,
    v_img)` before `to_out`. With a plain tensor as context, or no adapter, the arithmetic is the plain one.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        bias: bool = False,
        out_bias: bool = True,
        upcast: bool = False,
        norm_groups: int | None = None,
        norm_eps: float = 1e-5,
        residual: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.dim_head = dim_head
        self.upcast = upcast
        self.residual = residual
        self.group_norm = nn.GroupNorm(norm_groups, query_dim, eps=norm_eps) if norm_groups else None
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(0.0)])
        self.to_k_ip: nn.Linear | None = None
        self.to_v_ip: nn.Linear | None = None
        self.ip_scale = 1.0

    def forward(self, x: torch.Tensor, context: torch.Tensor | ImageContext | None = None) -> torch.Tensor:
        if x.ndim == 4:
            return self._forward_map(x, context)
        residual = x
        if self.group_norm is not None:
            x = self.group_norm(x.transpose(1, 2)).transpose(1, 2)
        out = self.attend(x, context)
        return out + residual if self.residual else out

    def attend(self, x: torch.Tensor, context: torch.Tensor | ImageContext | None = None) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v over (B, L, C) tokens (`context` for keys and values, else `x`), then `to_out`.

        An `ImageContext` adds `ip_scale` times the attention of the same queries to the image tokens (through
        `to_k_ip` / `to_v_ip`) where this layer has them and the scale is not 0; otherwise only its text is read.
        """
        image = None
        if isinstance(context, ImageContext):
            context, image = context
        context = x if context is None else context
        q, k, v = (
            self._heads(proj(t)) for proj, t in ((self.to_q, x), (self.to_k, context), (self.to_v, context))
        )
        out = self._sdpa(q, k, v)
        if image is not None and self.to_k_ip is not None and self.ip_scale != 0:
            k_img, v_img = self._heads(self.to_k_ip(image)), self._heads(self.to_v_ip(image))
            out = out + self.ip_scale * self._sdpa(q, k_img, v_img)
        out = out.transpose(1, 2).reshape(x.shape[0], -1, self.heads * self.dim_head)
        return self.to_out[0](out)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v)

    def _forward_map(self, x: torch.Tensor, context: torch.Tensor | ImageContext | None) -> torch.Tensor:
        """A (B, C, H, W) feature map as H*W tokens, returned as a map in the layout it came in."""
        shape = x.shape
        if is_channels_last(
            x
        ):  # (B, HW, C) tokens are a view of its memory, and so is the map made of the output
            normed = x if self.group_norm is None else self.group_norm(x)
            residual = x.permute(0, 2, 3, 1).reshape(shape[0], -1, shape[1])
            out = self.attend(normed.permute(0, 2, 3, 1).reshape(shape[0], -1, shape[1]), context)
            if self.residual:
                out = out + residual
            return out.view(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)
        tokens = x.flatten(2).transpose(1, 2)
        if self.group_norm is not None:
            tokens = self.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
        out = self.attend(tokens, context)
        # back to a plain NCHW map (the transposed view alone would be channels-last in memory, and the next layers
        # would run in that layout); the residual is added in the same pass
        view = out.transpose(1, 2).reshape(shape)
        if not self.residual:
            return view.contiguous()
        return torch.add(x, view, out=out.new_empty(shape))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, heads * dim_head) -> (B, heads, L, dim_head), made contiguous for CPU float32.

        The transposed view would do for `scaled_dot_product_attention`, but its CPU kernel reads that strided
        layout much more slowly in float32 than a contiguous copy plus the call (`docs/performance.md`); same
        values. Other dtypes and devices keep the view (half precision then rounds exactly as diffusers does).
        """
        heads = t.view(t.shape[0], -1, self.heads, self.dim_head).transpose(1, 2)
        return heads.contiguous() if t.device.type == "cpu" and t.dtype == torch.float32 else heads
