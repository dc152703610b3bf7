"""Tiny random IP-Adapters (h94/IP-Adapter file layout) and a tiny CLIP vision encoder, saved where both lcmkit and
diffusers load them.

The adapters fit `helpers.tiny_models.SD15` (cross-attention width 32; 6 cross-attentions: 32 channels on the outer
level, 64 in the mid block). `ip_adapter` keys count the attention layers as the reference does (down, up, mid;
attn1 even, attn2 odd), so N = 1, 3, ..., 11.
"""

from __future__ import annotations

from pathlib import Path

import torch

CROSS_DIM = 32
# (channels of each cross-attention) in the files' order: down_blocks.0 (2), up_blocks.1 (3), mid_block (1)
SD15_ATTN2_CHANNELS = (32, 32, 32, 32, 32, 64)
VISION_HIDDEN = 32
CLIP_DIM = 16  # the vision model's projection_dim: what the plain adapter's proj reads


def tiny_vision_config(image_size: int = 32):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=VISION_HIDDEN, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        image_size=image_size, patch_size=4, projection_dim=CLIP_DIM,
    )  # fmt: skip


def save_image_encoder(folder: Path, seed: int = 0) -> Path:
    """A seeded random `CLIPVisionModelWithProjection`, saved by transformers into `folder`."""
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(tiny_vision_config()).eval().save_pretrained(folder)
    return folder


def _randn(gen: torch.Generator, *shape: int, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def attention_weights(
    gen: torch.Generator, channels=SD15_ATTN2_CHANNELS, cross_dim: int = CROSS_DIM
) -> dict[str, torch.Tensor]:
    out = {}
    for i, c in enumerate(channels):
        out[f"{2 * i + 1}.to_k_ip.weight"] = _randn(gen, c, cross_dim)
        out[f"{2 * i + 1}.to_v_ip.weight"] = _randn(gen, c, cross_dim)
    return out


def plain_image_proj(
    gen: torch.Generator, cross_dim: int = CROSS_DIM, tokens: int = 4
) -> dict[str, torch.Tensor]:
    """ip-adapter_sd15: proj (CLIP embedding -> 4 tokens) and a LayerNorm."""
    return {
        "proj.weight": _randn(gen, tokens * cross_dim, CLIP_DIM),
        "proj.bias": _randn(gen, tokens * cross_dim),
        "norm.weight": 1 + _randn(gen, cross_dim),
        "norm.bias": _randn(gen, cross_dim),
    }


def plus_image_proj(
    gen: torch.Generator, hidden: int = 64, depth: int = 4, tokens: int = 5
) -> dict[str, torch.Tensor]:
    """ip-adapter-plus: the Perceiver resampler (one 64-wide head, the width every released file uses; depth 4,
    which diffusers assumes)."""
    sd = {
        "latents": _randn(gen, 1, tokens, hidden, scale=1.0),
        "proj_in.weight": _randn(gen, hidden, VISION_HIDDEN),
        "proj_in.bias": _randn(gen, hidden),
        "proj_out.weight": _randn(gen, CROSS_DIM, hidden),
        "proj_out.bias": _randn(gen, CROSS_DIM),
        "norm_out.weight": 1 + _randn(gen, CROSS_DIM),
        "norm_out.bias": _randn(gen, CROSS_DIM),
    }
    for n in range(depth):
        p = f"layers.{n}"
        for norm in ("0.norm1", "0.norm2", "1.0"):
            sd[f"{p}.{norm}.weight"] = 1 + _randn(gen, hidden)
            sd[f"{p}.{norm}.bias"] = _randn(gen, hidden)
        sd[f"{p}.0.to_q.weight"] = _randn(gen, hidden, hidden)
        sd[f"{p}.0.to_kv.weight"] = _randn(gen, 2 * hidden, hidden)
        sd[f"{p}.0.to_out.weight"] = _randn(gen, hidden, hidden)
        sd[f"{p}.1.1.weight"] = _randn(gen, 4 * hidden, hidden)
        sd[f"{p}.1.3.weight"] = _randn(gen, hidden, 4 * hidden)
    return sd


def ip_state_dict(kind: str = "plain", seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": ..., "ip_adapter": ...} for the tiny SD15 UNet."""
    gen = torch.Generator().manual_seed(seed)
    proj = plain_image_proj(gen) if kind == "plain" else plus_image_proj(gen)
    return {"image_proj": proj, "ip_adapter": attention_weights(gen)}


def save_ip_adapter(path: Path, groups: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Write `groups` as the h94 files are: flattened prefixes in safetensors, nested dicts in a torch `.bin`."""
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        flat = {f"{group}.{k}": v.contiguous() for group, sd in groups.items() for k, v in sd.items()}
        save_file(flat, str(path))
    else:
        torch.save(groups, path)
    return path


def save_ip_folder(folder: Path, kind: str = "plain", name: str = "ip-adapter_sd15.safetensors") -> Path:
    """`folder/<name>` and `folder/image_encoder/` (the layout of h94/IP-Adapter's `models/`)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_image_encoder(folder / "image_encoder")
    save_ip_adapter(folder / name, ip_state_dict(kind))
    return folder


def ip_state_dict_for(unet, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """A plain adapter for any lcmkit UNet (its cross-attentions found by `lcmkit.loading.ip_adapter`)."""
    from lcmkit.loading.ip_adapter import cross_attentions

    gen = torch.Generator().manual_seed(seed)
    cross_dim = unet.config.cross_attention_dim
    channels = [attn.heads * attn.dim_head for _, attn in cross_attentions(unet)]
    return {
        "image_proj": plain_image_proj(gen, cross_dim=cross_dim),
        "ip_adapter": attention_weights(gen, channels=channels, cross_dim=cross_dim),
    }
