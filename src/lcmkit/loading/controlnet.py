"""Loading ControlNets: diffusers folders, hub ids, and original single files (lllyasviel's ControlNet layout).

An original ControlNet file (`control_v11p_sd15_canny.pth`, its `.safetensors` conversions) holds a copy of the UNet's
encoder under its LDM names (`time_embed`, `input_blocks`, `middle_block`; usually prefixed `control_model.`), the hint
encoder as `input_hint_block.{0,2,4,...}` (convolutions between SiLUs), the zero convolutions as `zero_convs.N.0` and
`middle_block_out.0`. The config is read off the tensors, the UNet half is renamed by `single_file.unet_key_map`, and
the rest by the table below. This module (with `single_file.py`) is the only place that knows those names.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lcmkit.config import ControlNetConfig
from lcmkit.io.errors import ModelFileError, describe
from lcmkit.io.weights import check_keys
from lcmkit.loading.hub import hub_file, is_hub_id
from lcmkit.loading.single_file import (
    SD1_HEADS,
    SD_NORM_GROUPS,
    SUFFIXES,
    SingleFileError,
    read_checkpoint,
    translate,
    unet_key_map,
    unet_levels,
)
from lcmkit.models.controlnet import ControlNetModel as _ControlNetModel
from lcmkit.models.unet import UNet2DConditionModel

logger = logging.getLogger(__name__)

CONTROL_PREFIX = "control_model."
SD2_HEAD_WIDTH = 64  # SD 2.x attends with 64-wide heads (its configs give head counts of width / 64)


class ControlNetModel(_ControlNetModel):
    """`lcmkit.models.controlnet.ControlNetModel` with diffusers' loading surface.

    `from_pretrained(folder_or_hub_id)` reads a diffusers folder (`config.json` + `diffusion_pytorch_model.*`) or
    fetches one from the hub; `from_single_file(path)` reads an original ControlNet checkpoint.
    """

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | Path,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        **hub_kwargs: Any,
    ) -> ControlNetModel:
        folder = _resolve_folder(pretrained_model_name_or_path, subfolder, variant, hub_kwargs)
        model = super().from_pretrained(folder, torch_dtype=torch_dtype, variant=variant)
        model.name_or_path = str(folder)
        return model

    @classmethod
    def from_single_file(cls, path: str | Path, torch_dtype: torch.dtype | None = None) -> ControlNetModel:
        return controlnet_from_single_file(path, torch_dtype=torch_dtype)


def load_controlnet(
    source: str | Path | _ControlNetModel,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
    **hub_kwargs: Any,
) -> ControlNetModel:
    """A ControlNet from a diffusers folder, a single file (`.safetensors`, `.pth`, `.ckpt`, ...) or a hub id.

    A model passed in is returned as it is. Every problem with the files raises a `ModelFileError` naming the file.
    """
    if isinstance(source, _ControlNetModel):
        return source
    path = Path(source).expanduser()
    if path.is_file():
        return controlnet_from_single_file(path, torch_dtype=torch_dtype)
    return ControlNetModel.from_pretrained(source, torch_dtype=torch_dtype, variant=variant, **hub_kwargs)


def _resolve_folder(source: str | Path, subfolder: str | None, variant: str | None, hub_kwargs: dict) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path / subfolder if subfolder else path
    name = str(source)
    if path.exists() or not is_hub_id(name):
        raise ModelFileError(
            "is neither a ControlNet folder (config.json + diffusion_pytorch_model.safetensors), a single file "
            f"(one of {list(SUFFIXES)}) nor a hub id ('owner/name', e.g. 'lllyasviel/control_v11p_sd15_canny')",
            path,
        )
    config = hub_file(name, "config.json", subfolder=subfolder, **hub_kwargs)
    stem = f"diffusion_pytorch_model.{variant}" if variant else "diffusion_pytorch_model"
    try:
        hub_file(name, f"{stem}.safetensors", subfolder=subfolder, **hub_kwargs)
    except FileNotFoundError as e:
        if not str(e).startswith("hub repo"):  # not cached (offline): say so, do not look for .bin
            raise
        hub_file(name, f"{stem}.bin", subfolder=subfolder, **hub_kwargs)
    return config.parent


# ----------------------------------------------------------------------------------------------------------------------
# Original single files


def _control_part(sd: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The ControlNet's tensors without the `control_model.` prefix; a file of another kind is refused."""
    if any(k.startswith(CONTROL_PREFIX) for k in sd):
        part = {k[len(CONTROL_PREFIX) :]: v for k, v in sd.items() if k.startswith(CONTROL_PREFIX)}
    else:
        part = dict(sd)
    if "input_hint_block.0.weight" not in part or "time_embed.0.weight" not in part:
        keys = list(sd)[:3]
        raise SingleFileError(
            f"does not look like an original ControlNet checkpoint ({len(sd)} keys such as {keys}): expected "
            f"time_embed, input_blocks and input_hint_block, optionally under '{CONTROL_PREFIX}'",
            source,
        )
    return part


def _hint_indices(sd: Mapping[str, torch.Tensor]) -> list[int]:
    """The `input_hint_block` entries that are convolutions (the odd ones are SiLUs, without weights)."""
    rx = re.compile(r"input_hint_block\.(\d+)\.weight$")
    return sorted(int(m.group(1)) for k in sd if (m := rx.match(k)))


def infer_controlnet_config(sd: Mapping[str, torch.Tensor]) -> ControlNetConfig:
    """The config of an original-layout ControlNet (keys without `control_model.`), read off its tensors.

    Heads follow SD 1.x (8 per level), or SD 2.x (64-wide) when the file attends with linear projections.
    """
    levels = unet_levels(sd)
    channels = tuple(level[0] for level in levels)
    hint = _hint_indices(sd)
    if len(hint) < 2 or len(hint) % 2:
        raise SingleFileError(f"input_hint_block has convolutions {hint}; expected conv_in, pairs, conv_out")
    hint_widths = [sd[f"input_hint_block.{i}.weight"].shape[0] for i in hint]
    embedding = (hint_widths[0], *hint_widths[2:-1:2])
    mid_depth = len({k.split(".")[3] for k in sd if k.startswith("middle_block.1.transformer_blocks.")})
    to_k = next((v for k, v in sd.items() if k.endswith("attn2.to_k.weight")), None)
    proj_in = sd.get("middle_block.1.proj_in.weight")
    if to_k is None or proj_in is None or mid_depth == 0:
        raise SingleFileError(
            "the ControlNet has no cross-attention in its middle block; not an SD ControlNet"
        )
    linear = proj_in.ndim == 2
    heads = tuple(c // SD2_HEAD_WIDTH for c in channels) if linear else (SD1_HEADS,) * len(channels)
    cond = sd.get("time_embedding.cond_proj.weight", sd.get("time_embed.cond_proj.weight"))
    return ControlNetConfig(
        in_channels=sd["input_blocks.0.0.weight"].shape[1],
        block_out_channels=channels,
        down_attention=tuple(level[1] for level in levels),
        up_attention=tuple(level[1] for level in reversed(levels)),
        layers_per_block=tuple(level[3] for level in levels),
        transformer_layers_per_block=tuple(d if a else mid_depth for _, a, d, _ in levels),
        attention_head_dim=heads,
        cross_attention_dim=to_k.shape[1],
        use_linear_projection=linear,
        time_cond_proj_dim=cond.shape[1] if cond is not None else None,
        norm_num_groups=SD_NORM_GROUPS,
        conditioning_channels=sd["input_hint_block.0.weight"].shape[1],
        conditioning_embedding_out_channels=embedding,
    )


def controlnet_key_map(config: ControlNetConfig, hint: list[int]) -> dict[str, str]:
    """Original module path -> diffusers module path: the UNet half from `unet_key_map`, and the ControlNet's own."""
    key_map = unet_key_map(config)
    key_map["input_hint_block.0"] = "controlnet_cond_embedding.conv_in"
    for j, index in enumerate(hint[1:-1]):
        key_map[f"input_hint_block.{index}"] = f"controlnet_cond_embedding.blocks.{j}"
    key_map[f"input_hint_block.{hint[-1]}"] = "controlnet_cond_embedding.conv_out"
    n_zero = 1 + sum(config.layers_per_block) + len(config.block_out_channels) - 1
    for i in range(n_zero):
        key_map[f"zero_convs.{i}.0"] = f"controlnet_down_blocks.{i}"
    key_map["middle_block_out.0"] = "controlnet_mid_block"
    return key_map


def controlnet_from_single_file(path: str | Path, torch_dtype: torch.dtype | None = None) -> ControlNetModel:
    """An original ControlNet checkpoint as a `ControlNetModel`; a ModelFileError names the file otherwise."""
    source = str(path)
    sd = _control_part(read_checkpoint(path), source)
    try:
        config = infer_controlnet_config(sd)
        weights = translate(sd, controlnet_key_map(config, _hint_indices(sd)), "ControlNet")
    except ModelFileError as e:
        raise e.with_path(path) from None
    except (KeyError, ValueError, IndexError) as e:
        raise SingleFileError(f"is not a ControlNet lcmkit can read: {describe(e)}", path) from e
    with torch.device("meta"):
        model = ControlNetModel(config)
    check_keys(model, weights, source)
    if torch_dtype is not None:
        weights = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in weights.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    model.name_or_path = source
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------------
# Does it fit the pipeline's UNet?

_MUST_MATCH = ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim")


def check_controlnet_fits(controlnet: _ControlNetModel, unet: UNet2DConditionModel) -> None:
    """Refuse a ControlNet built for another base model (SDXL, SD 2.x on an SD 1.5 UNet, ...): its residuals or
    its text width would not fit. The ModelFileError names the ControlNet's file (`controlnet.name_or_path`)."""
    if not isinstance(controlnet, _ControlNetModel):
        raise TypeError(
            f"controlnet must be a lcmkit ControlNetModel (or a list of them), got {type(controlnet).__name__}"
        )
    unet_config = getattr(unet, "config", None)
    if unet_config is None:
        return
    wrong = [
        f"{name} {getattr(controlnet.config, name)} (the UNet has {getattr(unet_config, name)})"
        for name in _MUST_MATCH
        if getattr(controlnet.config, name) != getattr(unet_config, name)
    ]
    if wrong:
        what = "is a ControlNet" if controlnet.name_or_path else "this ControlNet (built in memory) is one"
        raise ModelFileError(
            f"{what} for another base model: {'; '.join(wrong)}. Use a ControlNet trained for this "
            "pipeline's UNet (SD 1.5 ControlNets for SD 1.5 models)",
            controlnet.name_or_path,
        )
