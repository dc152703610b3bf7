"""Original Stable Diffusion single-file checkpoints (the CompVis / A1111 layout) as lcmkit components.

A single file holds the UNet under `model.diffusion_model.`, the VAE under `first_stage_model.` and (SD 1.x) the CLIP
text encoder under `cond_stage_model.transformer.`. Every renaming from that layout to lcmkit's module names (which
are diffusers' names) lives in this module, and nowhere else.

Nothing is taken from a table of SD versions: the configs are read off the tensors (levels, channels, layers per
level, which levels attend, the context width, LCM's w-embedding input), and the key mapping is generated from those
configs. What the tensors cannot tell (attention heads, GroupNorm groups, the text tower's head count, the noise
schedule) comes from the published SD 1.x facts, stated once below. A local diffusers folder passed as `config=`
replaces the inferred configs, as in diffusers.

LCM single files written by diffusers' `convert_diffusers_to_original_stable_diffusion.py` keep the w-embedding
projection under its diffusers name, `model.diffusion_model.time_embedding.cond_proj.weight`; the LDM-style
spelling `time_embed.cond_proj.weight` is read too.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from lcmkit.config import UNetConfig, VAEConfig, read_config_json
from lcmkit.io.errors import MissingModelFileError, ModelFileError, describe
from lcmkit.io.weights import WeightsError, check_keys, load_state_dict
from lcmkit.models.text import load_tokenizer
from lcmkit.models.unet import UNet2DConditionModel
from lcmkit.models.vae import AutoencoderKL
from lcmkit.runtime import FastPaths
from lcmkit.schedulers import LCMScheduler

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
TOKENIZER_ASSET = "clip_vit_l14_tokenizer"

# Published SD 1.x facts that no tensor shape reveals.
SD1_IMAGE_SIZE = 512
SD1_HEADS = 8  # every attention level of the SD 1.x UNet has 8 heads, whatever its width
SD_NORM_GROUPS = 32  # GroupNorm groups in the UNet and the VAE
SD_VAE_SCALING = 0.18215
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
CLIP_HEAD_WIDTH = 64  # CLIP text towers use 64-wide attention heads (ViT-L/14: 768 / 12)

# Top-level entries of LDM training checkpoints that inference does not use (DDPM buffers, EMA bookkeeping).
_IGNORED_ROOT = re.compile(
    r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_\w+|log_one_minus_alphas_cumprod|posterior_\w+|logvar"
    r"|lvlb_weights|model_ema\..*)$"
)

_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


class SingleFileError(WeightsError):
    """A file is not an SD 1.x single-file checkpoint lcmkit can load: another kind of file, an unsupported
    version, or a layout whose parts disagree."""


class MissingSingleFileError(SingleFileError, MissingModelFileError):
    """The single-file checkpoint is not there (also a FileNotFoundError)."""


# Key prefixes of model families whose single files look like SD's (some share `model.diffusion_model.`) but are
# not SD 1.x/2.x: refused by name before anything is inferred from the tensors.
OTHER_FAMILIES = (
    (("conditioner.embedders.",), "an SDXL checkpoint (text encoders under conditioner.embedders.*)"),
    (
        (UNET_PREFIX + "label_emb.",),
        "an SDXL-style checkpoint (its UNet is conditioned on sizes or classes: model.diffusion_model.label_emb)",
    ),
    ((UNET_PREFIX + "joint_blocks.",), "a Stable Diffusion 3 checkpoint (MMDiT joint_blocks)"),
    (("double_blocks.", UNET_PREFIX + "double_blocks."), "a FLUX checkpoint (double_blocks)"),
)


# ----------------------------------------------------------------------------------------------------------------------
# Reading and splitting the file


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file, or of a `.ckpt`/`.pt` pickle read with `weights_only=True`.

    A pickle that would run code when unpickled is refused (torch's restricted unpickler), never executed.
    """
    text = str(path)
    if "://" in text:
        raise SingleFileError(
            f"{text} is a URL; lcmkit loads single files from local paths only (download the file first)"
        )
    path = Path(path)
    if not path.is_file():
        raise MissingSingleFileError("single-file checkpoint not found", path)
    if path.suffix.lower() not in SUFFIXES:
        raise SingleFileError(f"expected a checkpoint file ending in one of {list(SUFFIXES)}", path)
    return load_state_dict(path)


def split_checkpoint(
    state_dict: Mapping[str, torch.Tensor], source: str
) -> dict[str, dict[str, torch.Tensor]]:
    """Split into `unet`, `vae` and `text_encoder` parts (prefixes removed); fail on files of other kinds."""
    parts: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "vae": {}, "text_encoder": {}}
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_PREFIX}
    ignored = []
    for key, tensor in state_dict.items():
        for name, prefix in prefixes.items():
            if key.startswith(prefix):
                parts[name][key[len(prefix) :]] = tensor
                break
        else:
            ignored.append(key)
    for prefixes, family in OTHER_FAMILIES:
        if any(k.startswith(prefixes) for k in state_dict):
            raise SingleFileError(
                f"is {family}, which lcmkit does not support: it loads SD 1.x single files, and SD 1.x/2.x "
                "models as diffusers folders (from_pretrained)",
                source,
            )
    if not parts["unet"]:
        raise SingleFileError(_not_a_checkpoint(list(state_dict)), source)
    if any(k.startswith("cond_stage_model.model.") for k in state_dict):
        raise SingleFileError(
            "is an SD 2.x checkpoint (OpenCLIP text tower under cond_stage_model.model.); "
            "SD 2.x single files with OpenCLIP text towers are not supported yet. Convert it to a diffusers "
            "folder and use from_pretrained.",
            source,
        )
    unusual = [k for k in ignored if not _IGNORED_ROOT.match(k) and not k.startswith(("cond_stage_model.",))]
    if any(k.startswith("model_ema.") for k in ignored):
        logger.info("%s also holds EMA weights (model_ema.*); using the non-EMA weights", source)
    if unusual:
        logger.warning(
            "%s: ignoring %d keys outside the UNet, VAE and text encoder: %s",
            source,
            len(unusual),
            unusual[:8],
        )
    return parts


def _not_a_checkpoint(keys: list[str]) -> str:
    """Say what was expected and, when the keys tell, what the file is instead and which loader takes it."""
    message = (
        f"does not look like an original Stable Diffusion checkpoint ({len(keys)} keys such as "
        f"{', '.join(keys[:3])}): expected the UNet under '{UNET_PREFIX}', the VAE under '{VAE_PREFIX}' and the "
        f"text encoder under '{TEXT_PREFIX}'."
    )
    if any("lora" in k.lower() for k in keys):
        return (
            message
            + " It looks like a LoRA adapter: load it onto a pipeline with `pipe.load_lora_weights(path)`."
        )
    if any(k in ("emb_params", "clip_l") or k.startswith("string_to_param") for k in keys):
        return (
            message + " It looks like a textual-inversion embedding: use `pipe.load_textual_inversion(path)`."
        )
    if any(k.startswith(("down_blocks.", "conv_in.", "unet.")) for k in keys):
        return (
            message
            + " It holds diffusers-layout weights: load the whole folder with `from_pretrained(folder)`."
        )
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys):
        return message + " It looks like a standalone VAE: pass a model loaded from it as `vae=`."
    return message


def _need(sd: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise SingleFileError(f"the {what} weights lack `{key}`, which every SD 1.x checkpoint has")
    return sd[key]


def _indices(keys: Iterable[str], pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern` (one group) at the start of the keys."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


# ----------------------------------------------------------------------------------------------------------------------
# Configs from the tensors


def unet_levels(sd: Mapping[str, torch.Tensor]) -> list[tuple[int, bool, int, int]]:
    """Per down level: (width, attends, transformer depth, resnets), read from `input_blocks`.

    Levels are the runs of blocks between downsamplers (`input_blocks.k.0.op`); a block attends when it has a `.1`
    transformer. Every block of a level must agree, as in every SD UNet.
    """
    blocks: dict[int, list[str]] = {}
    for key in sd:
        if m := re.match(r"input_blocks\.(\d+)\.(.*)", key):
            blocks.setdefault(int(m.group(1)), []).append(m.group(2))
    runs: list[list[tuple[int, bool, int]]] = [[]]
    for k in sorted(i for i in blocks if i > 0):
        if "0.op.weight" in blocks[k]:
            runs.append([])
            continue
        width = _need(sd, f"input_blocks.{k}.0.out_layers.3.weight", "UNet").shape[0]
        depth = len(_indices(blocks[k], r"1\.transformer_blocks\.(\d+)\."))
        runs[-1].append((width, depth > 0, depth))
    if not all(runs):
        raise SingleFileError(
            "UNet input_blocks: a level has a downsampler but no resnet; not an SD UNet layout"
        )
    for i, run in enumerate(runs):
        if len(set(run)) != 1:
            raise SingleFileError(f"UNet level {i} mixes widths or attention across its blocks: {run}")
    return [(*run[0], len(run)) for run in runs]


def _unet_up_attention(sd: Mapping[str, torch.Tensor], layers: tuple[int, ...]) -> tuple[bool, ...]:
    """Whether each up stage (deepest first) attends: its first `output_blocks` entry has a `.1` transformer
    (a `.1.conv` there is an upsampler, not attention)."""
    n = len(layers)
    attends = []
    k = 0
    for index in range(n):
        head = f"output_blocks.{k}.1."
        attends.append(any(key.startswith(head) and not key.startswith(head + "conv.") for key in sd))
        k += layers[n - 1 - index] + 1
    n_out = len(_indices(sd, r"output_blocks\.(\d+)\."))
    if n_out != k:
        raise SingleFileError(
            f"the UNet has {n_out} output_blocks, but its input side ({layers} resnets per level) implies {k}"
        )
    return tuple(attends)


def infer_unet_config(sd: Mapping[str, torch.Tensor], sample_size: int = SD1_IMAGE_SIZE // 8) -> UNetConfig:
    """The UNet's config from its original-layout tensors (keys without `model.diffusion_model.`).

    Heads follow SD 1.x (8 per level), since head counts leave no trace in the shapes.
    """
    conv_in = _need(sd, "input_blocks.0.0.weight", "UNet")
    levels = unet_levels(sd)
    channels = tuple(level[0] for level in levels)
    layers = tuple(level[3] for level in levels)
    mid_depth = len(_indices(sd, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    if mid_depth == 0:
        raise SingleFileError(
            "the UNet has no middle_block.1 transformer; SD UNets attend in the middle block"
        )
    # a level without attention still names a depth: the mid block's, which the config reads from the last level
    depths = tuple(depth if attends else mid_depth for _, attends, depth, _ in levels)
    to_k = next((v for key, v in sd.items() if key.endswith("attn2.to_k.weight")), None)
    if to_k is None:
        raise SingleFileError(
            "the UNet has no cross-attention (attn2.to_k); it is not a text-conditioned SD UNet"
        )
    context_dim = to_k.shape[1]
    linear_proj = _need(sd, "middle_block.1.proj_in.weight", "UNet").ndim == 2
    if context_dim == 1024 or linear_proj:
        raise SingleFileError(
            f"this is an SD 2.x UNet (context width {context_dim}, linear_proj={linear_proj}); SD 2.x single files "
            "with OpenCLIP text towers are not supported yet. Convert it to a diffusers folder and use from_pretrained."
        )
    cond = sd.get("time_embedding.cond_proj.weight", sd.get("time_embed.cond_proj.weight"))
    time_dim = _need(sd, "time_embed.0.weight", "UNet").shape[0]
    for c in channels:
        if c % SD1_HEADS or c % SD_NORM_GROUPS:
            raise SingleFileError(
                f"UNet width {c} is not a multiple of {SD_NORM_GROUPS} (GroupNorm groups) and {SD1_HEADS} (heads), "
                "as SD 1.x requires; pass `config=<diffusers folder>` to give the model's real config"
            )
    return UNetConfig(
        sample_size=sample_size,
        in_channels=conv_in.shape[1],
        out_channels=_need(sd, "out.2.weight", "UNet").shape[0],
        block_out_channels=channels,
        down_attention=tuple(level[1] for level in levels),
        up_attention=_unet_up_attention(sd, layers),
        layers_per_block=layers,
        transformer_layers_per_block=depths,
        attention_head_dim=(SD1_HEADS,) * len(levels),
        cross_attention_dim=context_dim,
        use_linear_projection=False,
        time_cond_proj_dim=cond.shape[1] if cond is not None else None,
        time_embedding_dim=time_dim if time_dim != 4 * channels[0] else None,
        norm_num_groups=SD_NORM_GROUPS,
    )


def infer_vae_config(sd: Mapping[str, torch.Tensor], sample_size: int = SD1_IMAGE_SIZE) -> VAEConfig:
    """The VAE's config from its original-layout tensors (keys without `first_stage_model.`)."""
    conv_in = _need(sd, "encoder.conv_in.weight", "VAE")
    levels = _indices(sd, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise SingleFileError("the VAE has no encoder.down.* blocks")
    layers = {i: len(_indices(sd, rf"encoder\.down\.{i}\.block\.(\d+)\.")) for i in levels}
    up_layers = {i: len(_indices(sd, rf"decoder\.up\.{i}\.block\.(\d+)\.")) for i in levels}
    if len(set(layers.values())) != 1 or set(up_layers.values()) != {layers[0] + 1}:
        raise SingleFileError(
            f"VAE blocks per level: encoder {layers}, decoder {up_layers}; SD VAEs have the same count per encoder "
            "level and one more per decoder level"
        )
    channels = tuple(_need(sd, f"encoder.down.{i}.block.0.conv1.weight", "VAE").shape[0] for i in levels)
    for c in channels:
        if c % SD_NORM_GROUPS:
            raise SingleFileError(f"VAE width {c} is not a multiple of {SD_NORM_GROUPS} (GroupNorm groups)")
    return VAEConfig(
        in_channels=conv_in.shape[1],
        out_channels=_need(sd, "decoder.conv_out.weight", "VAE").shape[0],
        block_out_channels=channels,
        layers_per_block=layers[0],
        latent_channels=_need(sd, "encoder.conv_out.weight", "VAE").shape[0] // 2,
        norm_num_groups=SD_NORM_GROUPS,
        sample_size=sample_size,
        scaling_factor=SD_VAE_SCALING,
        use_quant_conv="quant_conv.weight" in sd,
        use_post_quant_conv="post_quant_conv.weight" in sd,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in sd,
    )


def clip_vit_l14_text_config(**changes: Any) -> Any:
    """`CLIPTextConfig` of OpenAI CLIP ViT-L/14's text tower, the SD 1.x text encoder (public model facts).

    `changes` replace fields (the tensors' sizes, for checkpoints with a smaller tower).
    """
    from transformers import CLIPTextConfig

    values = {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 768,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }
    values.update(changes)
    return CLIPTextConfig(**values)


def infer_text_config(sd: Mapping[str, torch.Tensor]) -> Any:
    """ViT-L/14's text config with the sizes read off the tensors (keys without `text_model.`)."""
    tokens = _need(sd, "embeddings.token_embedding.weight", "text encoder")
    hidden = tokens.shape[1]
    heads = max(1, hidden // CLIP_HEAD_WIDTH)
    if hidden % heads:
        raise SingleFileError(f"text encoder width {hidden} does not split into {CLIP_HEAD_WIDTH}-wide heads")
    return clip_vit_l14_text_config(
        vocab_size=tokens.shape[0],
        hidden_size=hidden,
        intermediate_size=_need(sd, "encoder.layers.0.mlp.fc1.weight", "text encoder").shape[0],
        num_hidden_layers=len(_indices(sd, r"encoder\.layers\.(\d+)\.")),
        num_attention_heads=heads,
        max_position_embeddings=_need(sd, "embeddings.position_embedding.weight", "text encoder").shape[0],
        projection_dim=hidden,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Key maps, generated from the configs: original module path -> lcmkit (diffusers) module path


def _unet_resnet(key_map: dict[str, str], old: str, new: str) -> None:
    for sub_old, sub_new in _UNET_RESNET.items():
        key_map[f"{old}.{sub_old}"] = f"{new}.{sub_new}"


def unet_key_map(config: UNetConfig) -> dict[str, str]:
    """Every UNet module: `input_blocks.k` runs level by level (resnet `.0`, transformer `.1`, downsampler `.0.op`),
    `output_blocks.k` mirrors them deepest first (upsampler at `.1.conv`, or `.2.conv` after a transformer)."""
    key_map = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "time_embedding.cond_proj": "time_embedding.cond_proj",  # as diffusers' converter writes LCM files
        "time_embed.cond_proj": "time_embedding.cond_proj",
        "input_blocks.0.0": "conv_in",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
        "middle_block.1": "mid_block.attentions.0",
    }
    n = len(config.block_out_channels)
    k = 1
    for level in range(n):
        for j in range(config.layers_per_block[level]):
            _unet_resnet(key_map, f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}")
            if config.down_attention[level]:
                key_map[f"input_blocks.{k}.1"] = f"down_blocks.{level}.attentions.{j}"
            k += 1
        if level < n - 1:
            key_map[f"input_blocks.{k}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            k += 1
    _unet_resnet(key_map, "middle_block.0", "mid_block.resnets.0")
    _unet_resnet(key_map, "middle_block.2", "mid_block.resnets.1")
    k = 0
    for index in range(n):
        count = config.layers_per_block[n - 1 - index] + 1
        for j in range(count):
            _unet_resnet(key_map, f"output_blocks.{k}.0", f"up_blocks.{index}.resnets.{j}")
            slot = 1
            if config.up_attention[index]:
                key_map[f"output_blocks.{k}.1"] = f"up_blocks.{index}.attentions.{j}"
                slot = 2
            if j == count - 1 and index < n - 1:
                key_map[f"output_blocks.{k}.{slot}.conv"] = f"up_blocks.{index}.upsamplers.0.conv"
            k += 1
    return key_map


def vae_key_map(config: VAEConfig) -> dict[str, str]:
    """Every VAE module. The decoder's `up.i` counts from the deepest level's opposite end: `up_blocks.k` is
    `up.{n-1-k}`; resnet shortcuts are `nin_shortcut`; mid attention is `attn_1.{norm,q,k,v,proj_out}`."""
    n = len(config.block_out_channels)
    key_map = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for side in ("encoder", "decoder"):
        key_map[f"{side}.conv_in"] = f"{side}.conv_in"
        key_map[f"{side}.norm_out"] = f"{side}.conv_norm_out"
        key_map[f"{side}.conv_out"] = f"{side}.conv_out"
        for j in (1, 2):
            _vae_resnet(key_map, f"{side}.mid.block_{j}", f"{side}.mid_block.resnets.{j - 1}")
        for old, new in _VAE_ATTENTION.items():
            key_map[f"{side}.mid.attn_1.{old}"] = f"{side}.mid_block.attentions.0.{new}"
    for i in range(n):
        for j in range(config.layers_per_block):
            _vae_resnet(key_map, f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}")
        if i < n - 1:
            key_map[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
        old = n - 1 - i
        for j in range(config.layers_per_block + 1):
            _vae_resnet(key_map, f"decoder.up.{old}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}")
        if i < n - 1:
            key_map[f"decoder.up.{old}.upsample.conv"] = f"decoder.up_blocks.{i}.upsamplers.0.conv"
    return key_map


def _vae_resnet(key_map: dict[str, str], old: str, new: str) -> None:
    key_map[old] = new  # norm1/conv1/norm2/conv2 keep their names
    key_map[f"{old}.nin_shortcut"] = f"{new}.conv_shortcut"


def translate(
    sd: Mapping[str, torch.Tensor], key_map: Mapping[str, str], what: str
) -> dict[str, torch.Tensor]:
    """Rename every key by its longest module prefix in `key_map`; a key no module claims is an error."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in sd.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            target = key_map.get(".".join(parts[:cut]))
            if target is not None:
                new = ".".join([target, *parts[cut:]])
                if new in out:
                    raise SingleFileError(f"the {what} weights hold `{new}` twice (under two original names)")
                out[new] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise SingleFileError(
            f"{len(unknown)} {what} keys fit no module of the layout read from the file: {sorted(unknown)[:8]}"
        )
    return out


def linear_from_conv(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original VAE attention projects with 1x1 convolutions; ours are Linear layers of the same weights."""
    for key, tensor in sd.items():
        if ".mid_block.attentions.0.to_" in key and key.endswith(".weight") and tensor.ndim == 4:
            if tensor.shape[2:] != (1, 1):
                raise SingleFileError(
                    f"VAE attention weight {key} is {tuple(tensor.shape)}, not a 1x1 convolution"
                )
            sd[key] = tensor[:, :, 0, 0]
    return sd


def text_encoder_state_dict(sd: Mapping[str, torch.Tensor], with_text_model: bool) -> dict[str, torch.Tensor]:
    """Keys of `cond_stage_model.transformer.` as transformers' `CLIPTextModel` names them.

    Most files nest the tower under `text_model.` (transformers' naming since its CLIP port), the oldest do not.
    transformers 4.x models expect that prefix, 5.x models do not (`with_text_model`). `position_ids` is a constant
    buffer, not a weight (and some files store it corrupted), so it is dropped and the model keeps its own.
    """
    out = {}
    for key, tensor in sd.items():
        key = key.removeprefix("text_model.")
        if key.endswith("position_ids"):
            continue
        out[f"text_model.{key}" if with_text_model else key] = tensor
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Building the components


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def _build(model_cls: type, config: Any, sd: dict[str, torch.Tensor], source: str, dtype: torch.dtype) -> Any:
    """Our model on the meta device, then the weights strictly (every key and shape), as `from_pretrained` does."""
    with torch.device("meta"):
        model = model_cls(config)
    check_keys(model, sd, source)
    model.load_state_dict(_cast(sd, dtype), strict=True, assign=True)
    return model.eval()


def build_unet(sd: Mapping[str, torch.Tensor], config: UNetConfig, source: str, dtype: torch.dtype) -> Any:
    return _build(UNet2DConditionModel, config, translate(sd, unet_key_map(config), "UNet"), source, dtype)


def build_vae(sd: Mapping[str, torch.Tensor], config: VAEConfig, source: str, dtype: torch.dtype) -> Any:
    weights = {k: v for k, v in sd.items() if not k.startswith("loss.")}  # training-only discriminator/LPIPS
    weights = linear_from_conv(translate(weights, vae_key_map(config), "VAE"))
    return _build(AutoencoderKL, config, weights, source, dtype)


def build_text_encoder(sd: Mapping[str, torch.Tensor], config: Any, source: str, dtype: torch.dtype) -> Any:
    """transformers' `CLIPTextModel` with the file's weights, checked strictly before transformers sees them."""
    from transformers import CLIPTextModel

    with torch.device("meta"):
        skeleton = CLIPTextModel(config)
    with_prefix = any(k.startswith("text_model.") for k in skeleton.state_dict())
    weights = _cast(text_encoder_state_dict(sd, with_prefix), dtype)
    check_keys(skeleton, weights, source)
    model = CLIPTextModel.from_pretrained(None, config=config, state_dict=weights)
    return model.to(dtype).eval()


def load_packaged_tokenizer() -> Any:
    """The CLIP ViT-L/14 tokenizer shipped inside lcmkit (`lcmkit/assets/`), so no download is needed."""
    from transformers import CLIPTokenizer

    with resources.as_file(resources.files("lcmkit") / "assets" / TOKENIZER_ASSET) as folder:
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def _configs_from_folder(folder: str | Path) -> dict[str, Any]:
    """Component configs of a local diffusers folder (`config=`), replacing what the tensors suggest."""
    from transformers import CLIPTextConfig

    folder = Path(folder)
    if not folder.is_dir():
        raise SingleFileError(
            f"config={str(folder)!r} is not a local folder; pass a diffusers-layout folder (hub ids are not resolved)",
            folder,
        )
    out: dict[str, Any] = {}
    for name, config_class in (("unet", UNetConfig), ("vae", VAEConfig)):
        config_file = folder / name / "config.json"
        if config_file.is_file():
            try:
                out[name] = config_class.from_diffusers(read_config_json(config_file))
            except ModelFileError as e:
                raise e.with_path(config_file) from None
    if (folder / "text_encoder" / "config.json").is_file():
        try:
            out["text_encoder"] = CLIPTextConfig.from_pretrained(
                folder / "text_encoder", local_files_only=True
            )
        except Exception as e:  # transformers' validation errors have no common base class
            config_file = folder / "text_encoder" / "config.json"
            raise ModelFileError(
                f"is not a valid CLIP text encoder config: {describe(e)}", config_file
            ) from e
    if (folder / "tokenizer").is_dir():
        out["tokenizer"] = folder / "tokenizer"
    if (folder / "scheduler").is_dir():
        out["scheduler"] = folder / "scheduler"
    if not out:
        raise SingleFileError(
            f"config folder {folder} has none of unet/, vae/, text_encoder/, tokenizer/, scheduler/", folder
        )
    return out


def load_single_file_components(
    path: str | Path,
    torch_dtype: torch.dtype | None = None,
    prediction_type: str | None = None,
    config: str | Path | None = None,
    given: Iterable[str] = (),
) -> dict[str, Any]:
    """unet, vae, text_encoder, tokenizer and scheduler from one original SD 1.x checkpoint.

    Components named in `given` are not built (the caller supplies them), and their weights need not be in the file.
    `config` is a local diffusers folder whose configs replace the inferred ones. Floating weights become
    `torch_dtype` (default float32, whatever the file stores).
    """
    try:
        return _load_components(path, torch_dtype, prediction_type, config, set(given))
    except ModelFileError as e:
        if "://" not in str(path):  # what inspecting the tensors found is said about this file
            e.with_path(path)
        raise


def _load_components(
    path: str | Path,
    torch_dtype: torch.dtype | None,
    prediction_type: str | None,
    config: str | Path | None,
    given: set[str],
) -> dict[str, Any]:
    dtype = torch_dtype or torch.float32
    source = str(path)
    parts = split_checkpoint(read_checkpoint(path), source)
    folder_configs = _configs_from_folder(config) if config is not None else {}
    out: dict[str, Any] = {}

    if "vae" not in given:
        if not parts["vae"]:
            raise SingleFileError(f"has no VAE (no '{VAE_PREFIX}' keys); pass one as `vae=`", source)
        vae_config = folder_configs.get("vae") or infer_vae_config(parts["vae"])
        out["vae"] = build_vae(parts["vae"], vae_config, source, dtype)
    if "unet" not in given:
        unet_config = folder_configs.get("unet")
        if unet_config is None:
            levels = len(_indices(parts["vae"], r"encoder\.down\.(\d+)\.")) or 4
            unet_config = infer_unet_config(parts["unet"], sample_size=SD1_IMAGE_SIZE // 2 ** (levels - 1))
        out["unet"] = build_unet(parts["unet"], unet_config, source, dtype)
        if unet_config.in_channels != 4:
            logger.warning(
                "%s: the UNet takes %d input channels (an inpainting or depth model?); LCM pipelines feed 4",
                source,
                unet_config.in_channels,
            )
    if "text_encoder" not in given:
        if not parts["text_encoder"]:
            raise SingleFileError(
                f"has no CLIP text encoder (no '{TEXT_PREFIX}' keys); pass one as `text_encoder=`", source
            )
        text_sd = {k.removeprefix("text_model."): v for k, v in parts["text_encoder"].items()}
        text_config = folder_configs.get("text_encoder") or infer_text_config(text_sd)
        out["text_encoder"] = build_text_encoder(parts["text_encoder"], text_config, source, dtype)
    if "tokenizer" not in given:
        tokenizer_dir = folder_configs.get("tokenizer")
        out["tokenizer"] = load_tokenizer(tokenizer_dir) if tokenizer_dir else load_packaged_tokenizer()
    if "scheduler" not in given:
        overrides = {"prediction_type": prediction_type} if prediction_type else {}
        scheduler_dir = folder_configs.get("scheduler")
        if scheduler_dir is not None:
            out["scheduler"] = LCMScheduler.from_pretrained(scheduler_dir, **overrides)
        else:
            out["scheduler"] = LCMScheduler(**SD_BETAS, prediction_type=prediction_type or "epsilon")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The pipeline method

_COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "feature_extractor", "image_encoder")
_IGNORED_KWARGS = ("local_files_only",)  # accepted for diffusers compatibility; we never download


class FromSingleFileMixin:
    """`Pipeline.from_single_file(path)`: an original SD 1.x checkpoint (`.safetensors`, `.ckpt`) as a pipeline."""

    @classmethod
    def from_single_file(
        cls,
        pretrained_model_link_or_path: str | Path,
        torch_dtype: torch.dtype | None = None,
        prediction_type: str | None = None,
        safety_checker: Any = None,
        **overrides: Any,
    ) -> Any:
        """Load a CompVis/A1111-layout checkpoint offline, with the CLIP ViT-L/14 tokenizer shipped in lcmkit.

        `overrides` may hold components that replace the file's (`unet=`, `vae=`, `text_encoder=`, `tokenizer=`,
        `scheduler=`, `feature_extractor=`), `config=` (a local diffusers folder whose configs replace the inferred
        ones), `requires_safety_checker=`, `dtype=` (a synonym of `torch_dtype`), `fast_paths=` and `fast=` (as for
        `from_pretrained`). Single files carry no safety checker: pass `safety_checker=` with a `feature_extractor=`
        to screen images.
        """
        fast_paths = FastPaths.chosen(overrides.pop("fast", False), overrides.pop("fast_paths", None))
        dtype = overrides.pop("dtype", None)
        torch_dtype = torch_dtype or dtype
        config = overrides.pop("config", None)
        requires_safety_checker = overrides.pop("requires_safety_checker", safety_checker is not None)
        for key in _IGNORED_KWARGS:
            overrides.pop(key, None)
        unknown = sorted(set(overrides) - set(_COMPONENTS))
        if unknown:
            raise TypeError(
                f"from_single_file got unexpected arguments {unknown}; allowed: torch_dtype, prediction_type, "
                f"safety_checker, config, requires_safety_checker, fast_paths, fast, and the components {list(_COMPONENTS)}"
            )
        components = load_single_file_components(
            pretrained_model_link_or_path,
            torch_dtype=torch_dtype,
            prediction_type=prediction_type,
            config=config,
            given=overrides,
        )
        components.update(overrides)
        if safety_checker is None:
            logger.info("single files carry no safety checker; images will not be screened")
        pipe = cls(
            **components, safety_checker=safety_checker, requires_safety_checker=requires_safety_checker
        )
        if fast_paths is not None:
            pipe.set_fast_paths(fast_paths)
        return pipe
