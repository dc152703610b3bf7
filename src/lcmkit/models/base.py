"""What every lcmkit model shares: a typed config, dtype/device, and diffusers-folder load/save."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lcmkit.config import read_config_json
from lcmkit.loading.weights import check_keys, find_weights_file, load_state_dict, save_state_dict


class ModelMixin(nn.Module):
    """Base class. Subclasses set `config_class` and take one config object in `__init__`."""

    config_class: ClassVar[type]
    config: Any

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @classmethod
    def from_config(cls, config: Any) -> ModelMixin:
        if isinstance(config, dict):
            config = cls.config_class.from_diffusers(config)
        return cls(config)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        device: str | torch.device = "cpu",
    ) -> ModelMixin:
        """Build from `config.json` on the meta device, then load the weights strictly (every key and shape)."""
        folder = Path(folder) / subfolder if subfolder else Path(folder)
        config = cls.config_class.from_diffusers(read_config_json(folder / "config.json"))
        path = find_weights_file(folder, variant)
        state_dict = load_state_dict(path, device=device)
        with torch.device("meta"):
            model = cls(config)
        check_keys(model, state_dict, str(path))
        if torch_dtype is not None:
            state_dict = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.eval()

    def save_pretrained(self, folder: str | Path, variant: str | None = None) -> None:
        """Write `config.json` and `diffusion_pytorch_model.safetensors`, a folder diffusers can load."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config.to_diffusers(), indent=2) + "\n")
        name = "diffusion_pytorch_model.safetensors"
        if variant:
            name = f"diffusion_pytorch_model.{variant}.safetensors"
        save_state_dict(self.state_dict(), folder / name)


class SlicingTilingMixin:
    """The diffusers VAE switches: `use_slicing` (one sample at a time) and `use_tiling` (overlapping tiles)."""

    use_slicing: bool = False
    use_tiling: bool = False

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self) -> None:
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False
