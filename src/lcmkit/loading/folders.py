"""Diffusers-layout pipeline folders: `model_index.json` plus one subfolder per component.

Reading maps each component entry to lcmkit's own class (or to transformers' CLIP classes); writing produces a folder
that diffusers' own `LatentConsistencyModelPipeline.from_pretrained` loads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from lcmkit.config import read_config_json

logger = logging.getLogger(__name__)

DIFFUSERS_VERSION = "0.30.0"  # written to model_index.json; diffusers only compares it for warnings

# component name -> (library, class name) as diffusers writes them in model_index.json
COMPONENT_CLASSES: dict[str, tuple[str, str]] = {
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "unet": ("diffusers", "UNet2DConditionModel"),
    "scheduler": ("diffusers", "LCMScheduler"),
    "safety_checker": ("stable_diffusion", "StableDiffusionSafetyChecker"),
    "feature_extractor": ("transformers", "CLIPImageProcessor"),
    "image_encoder": ("transformers", "CLIPVisionModelWithProjection"),
}
REQUIRED = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
_NOT_GIVEN = object()


class PipelineFolderError(ValueError):
    """A pipeline folder is missing, incomplete, or names components lcmkit cannot load."""


def read_model_index(path: Path) -> dict:
    if not path.is_dir():
        raise PipelineFolderError(
            f"{path} is not a folder. Pass a diffusers-layout folder (with model_index.json); "
            "loading by hub id and single-file checkpoints are handled by the loaders in lcmkit.loading."
        )
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise PipelineFolderError(f"{path} has no model_index.json, so it is not a diffusers pipeline folder")
    return read_config_json(index_file)


def _entry_class(entry: Any) -> str | None:
    """Class name from a model_index entry `[library, class]`; None for an absent optional component."""
    if isinstance(entry, (list, tuple)) and len(entry) == 2:
        return entry[1]
    return None


def _load_one(
    name: str, cls_name: str, folder: Path, torch_dtype: torch.dtype | None, variant: str | None
) -> Any:
    if not folder.is_dir():
        raise PipelineFolderError(f"model_index.json lists `{name}` ({cls_name}) but {folder} does not exist")
    if name == "unet":
        from lcmkit.models.unet import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch_dtype, variant=variant)
    if name == "vae":
        if cls_name == "AutoencoderTiny":
            from lcmkit.models.tiny_vae import AutoencoderTiny

            return AutoencoderTiny.from_pretrained(folder, torch_dtype=torch_dtype, variant=variant)
        if cls_name != "AutoencoderKL":
            raise PipelineFolderError(
                f"vae class {cls_name!r} is not supported (supported: 'AutoencoderKL', 'AutoencoderTiny')"
            )
        from lcmkit.models.vae import AutoencoderKL

        return AutoencoderKL.from_pretrained(folder, torch_dtype=torch_dtype, variant=variant)
    if name == "text_encoder":
        from lcmkit.models.text import load_text_encoder

        return load_text_encoder(folder, dtype=torch_dtype, variant=variant)
    if name == "tokenizer":
        from lcmkit.models.text import load_tokenizer

        return load_tokenizer(folder)
    if name == "scheduler":
        from lcmkit.schedulers import LCMScheduler

        if cls_name != "LCMScheduler":
            logger.info("folder has a %s config; building an LCMScheduler from it", cls_name)
        return LCMScheduler.from_pretrained(folder)
    if name == "safety_checker":
        from lcmkit.models.safety import SafetyChecker

        return SafetyChecker.from_pretrained(folder, dtype=torch_dtype, variant=variant)
    if name == "feature_extractor":
        from lcmkit.models.safety import load_feature_extractor

        return load_feature_extractor(folder)
    raise PipelineFolderError(f"component `{name}` ({cls_name}) is not supported by lcmkit")


def load_components(
    path: str | Path,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict]:
    """Load every component named in `model_index.json`; entries of `overrides` replace (or, as None, drop) one.

    Returns the components and the raw index (for flags like `requires_safety_checker`).
    """
    path = Path(path)
    index = read_model_index(path)
    overrides = overrides or {}
    components: dict[str, Any] = {}
    for name in COMPONENT_CLASSES:
        if name in overrides:
            components[name] = overrides[name]
            continue
        cls_name = _entry_class(index.get(name))
        if cls_name is None:
            if name in REQUIRED:
                raise PipelineFolderError(
                    f"{path}/model_index.json has no `{name}` component, which the pipeline needs"
                )
            components[name] = None
            continue
        if name == "image_encoder":
            logger.warning("ignoring the folder's image_encoder: IP-Adapter is not supported by lcmkit yet")
            components[name] = None
            continue
        components[name] = _load_one(name, cls_name, path / name, torch_dtype, variant)
    unknown = sorted(set(overrides) - set(COMPONENT_CLASSES))
    if unknown:
        raise PipelineFolderError(
            f"unknown pipeline components {unknown}; known: {sorted(COMPONENT_CLASSES)}"
        )
    return components, index


def save_components(
    components: dict[str, Any], path: str | Path, pipeline_class: str, extra: dict | None = None
) -> None:
    """Write `model_index.json` and each component's subfolder (safetensors weights, configs, tokenizer files)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": pipeline_class, "_diffusers_version": DIFFUSERS_VERSION}
    index.update(extra or {})
    for name, (library, cls_name) in COMPONENT_CLASSES.items():
        component = components.get(name)
        if component is None:
            index[name] = [None, None]
            continue
        if name == "vae":  # AutoencoderKL or AutoencoderTiny: our class names are the diffusers ones
            cls_name = type(component).__name__
        index[name] = [library, cls_name]
        # our models write diffusers configs; the transformers objects' own format is the diffusers format
        component.save_pretrained(path / name)
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
