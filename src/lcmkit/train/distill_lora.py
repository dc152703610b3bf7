"""LCM-LoRA (Luo et al. 2023, arXiv:2311.05556): latent consistency distillation into low-rank adapters.

The student is the teacher UNet itself plus one trainable LoRA adapter (rank r, scale alpha / r) on the layers
named by `targets`; only the adapter learns. There is no w-embedding input, so the guidance scale w drawn per
sample reaches only the teacher's guided DDIM step, and the result is a plain SD LoRA that any SD pipeline with an
LCM scheduler can use. The loss is LCD's, computed by the same `LCDObjective` (`lcmkit.train.distill`); this module
holds what differs: where the adapter goes, how it starts, what a checkpoint keeps, and the file it becomes.

Initialisation follows PEFT's default (A kaiming-uniform, B = 0), so B A = 0 and the student starts as the teacher.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from lcmkit.loading.lora import LORA_WEIGHT_NAMES, lora_state_dict_kohya
from lcmkit.nn.lora import LoraLayer, LoraWeights, inject_adapter, lora_layers, set_active_adapters

logger = logging.getLogger(__name__)

ADAPTER_NAME = "lcm"
# pytorch_lora_weights.safetensors, the name `load_lora_weights` looks for
LORA_WEIGHT_NAME = LORA_WEIGHT_NAMES[0]
# Every attention projection, transformer feed-forward, resnet conv and time projection and the resampler convs:
# the target list of the published LCM-LoRA training scripts (diffusers' train_lcm_distill_lora_sd_wds.py).
LCM_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TARGET_PRESETS: dict[str, tuple[str, ...]] = {"lcm": LCM_LORA_TARGETS, "attention": ATTENTION_TARGETS}


def resolve_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """A preset name (`lcm`, `attention`), a comma-separated string, or a sequence of module-name suffixes."""
    if isinstance(targets, str):
        targets = TARGET_PRESETS.get(targets) or targets.split(",")
    names = tuple(t.strip() for t in targets if t.strip())
    if not names:
        raise ValueError(
            f"no LoRA targets given; use a preset {sorted(TARGET_PRESETS)} or module-name suffixes such as to_q"
        )
    return names


def target_modules(unet: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Paths of the Linear/Conv2d modules whose name is a target or ends with `.<target>` (PEFT's rule).

    A target that matches nothing only warns (a small UNet may lack `conv_shortcut` or resamplers) as long as
    some target matches; a target that names a module of another kind is an error (`to_out` is a container).
    """
    targets = resolve_targets(targets)
    found, wrong_kind, used = [], set(), set()
    for name, module in unet.named_modules():
        hit = next((t for t in targets if name == t or name.endswith("." + t)), None)
        if hit is None:
            continue
        used.add(hit)
        if isinstance(module, (nn.Linear, nn.Conv2d, LoraLayer)):
            found.append(name)
        else:
            wrong_kind.add(f"{hit} ({type(module).__name__})")
    if wrong_kind:
        raise ValueError(
            f"LoRA targets must name Linear or Conv2d layers; these name other modules: {sorted(wrong_kind)}"
        )
    if not found:
        raise ValueError(f"no Linear or Conv2d layer of the UNet matches the LoRA targets {list(targets)}")
    unused = [t for t in targets if t not in used]
    if unused:
        logger.warning("LoRA targets that match no layer of this UNet: %s", unused)
    return found


def add_lcm_lora(
    unet: nn.Module,
    rank: int,
    alpha: float | None = None,
    targets: str | Sequence[str] = LCM_LORA_TARGETS,
    adapter_name: str = ADAPTER_NAME,
    generator: torch.Generator | None = None,
) -> list[nn.Parameter]:
    """Freeze `unet` and give it one trainable adapter (float32) on `targets`; returns the adapter's parameters.

    `alpha` defaults to the rank (scale 1, the diffusers script's default). The adapter is float32 whatever the
    frozen weights' dtype, so the optimizer and a gradient scaler work on full-precision values.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"the LoRA rank must be an integer >= 1, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"the LoRA alpha must be a number > 0, got {alpha!r}")
    unet.requires_grad_(False)
    layers = {}
    for name in target_modules(unet, targets):
        weight = unet.get_submodule(name).weight
        down = torch.empty(rank, *weight.shape[1:], device=weight.device)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        up_shape = (weight.shape[0], rank, 1, 1) if weight.ndim == 4 else (weight.shape[0], rank)
        layers[name] = LoraWeights(down, torch.zeros(up_shape, device=weight.device), alpha)
    inject_adapter(unet, adapter_name, layers, trainable=True)
    set_active_adapters(unet, [adapter_name], [1.0])
    params = adapter_tensors(unet, adapter_name)
    for name, lora in layers.items():  # the float32 values themselves, not the copy in the frozen dtype
        params[f"{name}.lora_down"].data = lora.down
        params[f"{name}.lora_up"].data = lora.up
    return list(params.values())


def adapter_tensors(unet: nn.Module, adapter_name: str = ADAPTER_NAME) -> dict[str, nn.Parameter]:
    """`{<module path>.lora_down|lora_up: parameter}` for one adapter, in module order."""
    out = {}
    for name, layer in lora_layers(unet):
        if adapter_name in layer.scales:
            out[f"{name}.lora_down"] = layer.lora_down[adapter_name]
            out[f"{name}.lora_up"] = layer.lora_up[adapter_name]
    return out


class LoraStudent(nn.Module):
    """The teacher UNet with its LCM adapter, as the module `fit` optimises.

    `forward` is the UNet's (so accelerate's autocast and DDP wrap the online pass). The state dict is the adapter
    alone: LoRA tensors are deliberately outside the UNet's own state dict (`lcmkit.nn.lora`), and the frozen
    weights need no checkpointing, so a checkpoint holds exactly what trains and resuming restores it.
    """

    def __init__(self, unet: nn.Module, adapter_name: str = ADAPTER_NAME) -> None:
        super().__init__()
        self.unet = unet
        self.adapter_name = adapter_name
        if not adapter_tensors(unet, adapter_name):
            raise ValueError(f"the UNet has no adapter named {adapter_name!r}; call add_lcm_lora first")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.unet(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in adapter_tensors(self.unet, self.adapter_name).items()}

    def load_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False
    ) -> _IncompatibleKeys:
        params = adapter_tensors(self.unet, self.adapter_name)
        missing, unexpected = (
            sorted(params.keys() - state_dict.keys()),
            sorted(state_dict.keys() - params.keys()),
        )
        if strict and (missing or unexpected):
            raise ValueError(
                f"this checkpoint does not hold the LCM-LoRA adapter being trained (a different rank, targets, or "
                f"a full-LCD run?): missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        with torch.no_grad():
            for key in params.keys() & state_dict.keys():
                if params[key].shape != state_dict[key].shape:
                    raise ValueError(
                        f"checkpoint tensor {key} has shape {tuple(state_dict[key].shape)}, the adapter "
                        f"{tuple(params[key].shape)} (was the run started with another --lora-rank?)"
                    )
                params[key].copy_(state_dict[key])
        return _IncompatibleKeys(missing, unexpected)


def save_lcm_lora(
    folder: str | Path,
    unet: nn.Module,
    adapter_name: str = ADAPTER_NAME,
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write `<folder>/pytorch_lora_weights.safetensors`: the adapter in kohya format with diffusers module names.

    Keys `lora_unet_<path with . as _>.lora_down.weight` / `.lora_up.weight` / `.alpha` (float32), the format of the
    published LCM-LoRA files; lcmkit's and diffusers' `load_lora_weights` both read it, with alpha per layer in the
    file itself. `info` (rank, targets, distillation settings) goes into the header metadata as JSON.
    """
    path = Path(folder) / LORA_WEIGHT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.float().contiguous() for k, v in lora_state_dict_kohya(unet, adapter_name).items()}
    metadata = {"format": "pt"}
    if info:
        metadata["lcmkit_lcm_lora"] = json.dumps(dict(info), default=str)
    save_file(tensors, str(path), metadata=metadata)
    return path
