"""What every lcmkit model shares: a typed config, dtype/device, and diffusers-folder load/save."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lcmkit.config import read_config_json, require_settings
from lcmkit.io.errors import ModelFileError, describe
from lcmkit.io.weights import check_keys, find_weights_file, load_state_dict, save_state_dict


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
        """Build from `config.json` on the meta device, then load the weights strictly (every key and shape).

        Every problem with the folder's files raises a `ModelFileError` naming the file: a config that is not a
        JSON object of settings, has values of the wrong type or describes a model that cannot be built, and
        weights that are missing, damaged or do not fit the config.
        """
        folder = Path(folder) / subfolder if subfolder else Path(folder)
        config_file = folder / "config.json"
        config = cls._read_config(config_file)
        path = find_weights_file(folder, variant)
        state_dict = load_state_dict(path, device=device)
        try:
            with torch.device("meta"):
                model = cls(config)
        except ModelFileError as e:
            raise e.with_path(config_file) from None
        except (TypeError, ValueError, ZeroDivisionError, RuntimeError) as e:  # a config no model can have
            raise ModelFileError(f"describes a model that cannot be built: {describe(e)}", config_file) from e
        check_keys(model, state_dict, str(path))
        if torch_dtype is not None:
            state_dict = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.eval()

    @classmethod
    def _read_config(cls, config_file: Path) -> Any:
        """The typed config of `config_file`; a ModelFileError naming the file for anything wrong with it."""
        what = cls.__name__
        cfg = require_settings(read_config_json(config_file), config_file, what)
        try:
            return cls.config_class.from_diffusers(cfg)
        except ModelFileError as e:
            raise e.with_path(config_file) from None
        except (TypeError, ValueError, KeyError, AttributeError) as e:  # a value the reader did not foresee
            raise ModelFileError(f"is not a valid {what} config: {describe(e)}", config_file) from e

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
