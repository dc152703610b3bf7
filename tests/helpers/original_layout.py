"""Write tiny diffusers models as an original (CompVis / A1111) Stable Diffusion single file, for loader tests.

The inverse mapping (diffusers name -> original name) is written here by hand from the published layout, with
closed-form block indices, independently of `lcmkit.loading.single_file` (which walks the layout the other way).
Assumes what SD 1.x has: the same number of resnets at every level.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

# Non-weight entries real LDM checkpoints carry at the top level; loaders must skip them.
DDPM_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "posterior_variance")


def _resnet_part(rest: str, table: dict[str, str]) -> str:
    head, dot, tail = rest.partition(".")
    return table[head] + dot + tail


def unet_to_original(sd: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> `model.diffusion_model.*` keys (layers = resnets per down level)."""
    fixed = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "time_embedding.cond_proj": "time_embedding.cond_proj",  # diffusers' converter keeps this name
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    attends_up = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        if module in fixed:
            new = fixed[module]
        elif m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", module):
            i, j = int(m.group(1)), int(m.group(2))
            new = f"input_blocks.{1 + i * (layers + 1) + j}.0.{_resnet_part(m.group(3), UNET_RESNET)}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module):
            i, j = int(m.group(1)), int(m.group(2))
            new = f"input_blocks.{1 + i * (layers + 1) + j}.1.{m.group(3)}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
            new = f"input_blocks.{(int(m.group(1)) + 1) * (layers + 1)}.0.op"
        elif m := re.match(r"mid_block\.resnets\.(\d)\.(.+)", module):
            new = f"middle_block.{2 * int(m.group(1))}.{_resnet_part(m.group(2), UNET_RESNET)}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", module):
            new = f"middle_block.1.{m.group(1)}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", module):
            i, j = int(m.group(1)), int(m.group(2))
            new = f"output_blocks.{i * (layers + 1) + j}.0.{_resnet_part(m.group(3), UNET_RESNET)}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module):
            i, j = int(m.group(1)), int(m.group(2))
            new = f"output_blocks.{i * (layers + 1) + j}.1.{m.group(3)}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
            i = int(m.group(1))
            slot = 2 if i in attends_up else 1
            new = f"output_blocks.{i * (layers + 1) + layers}.{slot}.conv"
        else:
            raise KeyError(f"no original name for UNet key {key}")
        out[f"model.diffusion_model.{new}.{param}"] = value
    return out


def vae_to_original(sd: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> `first_stage_model.*`; mid attention projections become 1x1 conv weights."""
    out = {}
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        side, _, rest = module.partition(".")
        if side in ("quant_conv", "post_quant_conv"):
            new = module
        elif rest in ("conv_in", "conv_out"):
            new = module
        elif rest == "conv_norm_out":
            new = f"{side}.norm_out"
        elif m := re.match(r"mid_block\.resnets\.(\d)\.(.+)", rest):
            new = f"{side}.mid.block_{int(m.group(1)) + 1}.{m.group(2)}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", rest):
            new = f"{side}.mid.attn_1.{VAE_ATTENTION[m.group(1)]}"
            if param == "weight" and value.ndim == 2:
                value = value[:, :, None, None]
        elif m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
            new = f"encoder.down.{m.group(1)}.block.{m.group(2)}.{m.group(3)}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", rest):
            new = f"encoder.down.{m.group(1)}.downsample.conv"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
            new = f"decoder.up.{levels - 1 - int(m.group(1))}.block.{m.group(2)}.{m.group(3)}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", rest):
            new = f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.conv"
        else:
            raise KeyError(f"no original name for VAE key {key}")
        new = new.replace("conv_shortcut", "nin_shortcut")
        out[f"first_stage_model.{new}.{param}"] = value
    return out


def text_to_original(sd: dict[str, torch.Tensor], with_text_model: bool = True) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel keys -> `cond_stage_model.transformer.[text_model.]*`, with the position_ids
    buffer that real SD 1.x files store."""
    inner = "text_model." if with_text_model else ""
    out = {f"cond_stage_model.transformer.{inner}{k.removeprefix('text_model.')}": v for k, v in sd.items()}
    positions = next(v for k, v in sd.items() if k.endswith("position_embedding.weight")).shape[0]
    out[f"cond_stage_model.transformer.{inner}embeddings.position_ids"] = torch.arange(positions)[None]
    return out


def original_state_dict(
    unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module, with_text_model: bool = True
) -> dict[str, torch.Tensor]:
    """The whole single file (plus DDPM buffers), from diffusers / transformers modules."""
    layers = unet.config.layers_per_block
    if not isinstance(layers, int):
        raise ValueError("these helpers assume one layers_per_block for all levels")
    sd = unet_to_original(dict(unet.state_dict()), layers)
    sd.update(vae_to_original(dict(vae.state_dict()), len(vae.config.block_out_channels)))
    sd.update(text_to_original(dict(text_encoder.state_dict()), with_text_model))
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    for name in DDPM_BUFFERS:
        sd[name] = betas.float()  # values do not matter; loaders must ignore these
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def save_original(sd: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 1}, str(path))
    return path


def controlnet_to_original(sd: dict[str, torch.Tensor], layers: int, prefix: str = "control_model.") -> dict:
    """diffusers ControlNetModel keys -> the original ControlNet layout (lllyasviel's `cldm`): the UNet half as
    in `unet_to_original`, the hint encoder as `input_hint_block.{0,2,4,...}`, zero convolutions as
    `zero_convs.N.0` and `middle_block_out.0`; every key under `prefix`."""
    n_blocks = len({k.split(".")[2] for k in sd if k.startswith("controlnet_cond_embedding.blocks.")})
    trunk, out = {}, {}
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        if module == "controlnet_cond_embedding.conv_in":
            new = "input_hint_block.0"
        elif module == "controlnet_cond_embedding.conv_out":
            new = f"input_hint_block.{2 * (n_blocks + 1)}"
        elif m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)$", module):
            new = f"input_hint_block.{2 * (int(m.group(1)) + 1)}"
        elif m := re.match(r"controlnet_down_blocks\.(\d+)$", module):
            new = f"zero_convs.{m.group(1)}.0"
        elif module == "controlnet_mid_block":
            new = "middle_block_out.0"
        else:
            trunk[key] = value
            continue
        out[f"{prefix}{new}.{param}"] = value
    for key, value in unet_to_original(trunk, layers).items():
        out[prefix + key.removeprefix("model.diffusion_model.")] = value
    return {k: v.detach().contiguous().clone() for k, v in out.items()}
