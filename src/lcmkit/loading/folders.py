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
from lcmkit.io.errors import MissingModelFileError, ModelFileError, describe, one_line
from lcmkit.models.safety import SafetyChecker, load_feature_extractor
from lcmkit.models.text import load_text_encoder, load_tokenizer
from lcmkit.models.tiny_vae import AutoencoderTiny
from lcmkit.models.unet import UNet2DConditionModel
from lcmkit.models.vae import AutoencoderKL
from lcmkit.schedulers import LCMScheduler

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
# Class names (model_index.json's second entry) lcmkit can load each component from. Models must match exactly;
# for the transformers parts a prefix is enough, since the name only picks an implementation of the same files
# (CLIPTokenizerFast, CLIPImageProcessorPil, CLIPTextModelWithProjection: its text tower is what SD uses).
# None: any class (see _load_one).
LOADABLE: dict[str, tuple[str, ...] | None] = {
    "vae": ("AutoencoderKL", "AutoencoderTiny"),
    "text_encoder": ("CLIPTextModel*",),
    "tokenizer": ("CLIPTokenizer*",),
    "unet": ("UNet2DConditionModel",),
    "scheduler": None,  # any diffusers scheduler config: an LCMScheduler is built from its betas
    "safety_checker": ("StableDiffusionSafetyChecker",),
    "feature_extractor": ("CLIPImageProcessor*", "CLIPFeatureExtractor*"),
    "image_encoder": None,  # not read from pipeline folders: load_ip_adapter loads its own
}


def _loadable(cls_name: str, allowed: tuple[str, ...]) -> bool:
    return any(cls_name.startswith(a[:-1]) if a.endswith("*") else cls_name == a for a in allowed)


SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")
_NOT_GIVEN = object()


class PipelineFolderError(ModelFileError):
    """A pipeline folder is missing, incomplete, or names components lcmkit cannot load."""


class MissingFolderError(PipelineFolderError, MissingModelFileError):
    """A component folder that model_index.json lists is not there (also a FileNotFoundError)."""


def read_model_index(path: Path) -> dict:
    """`model_index.json` of a pipeline folder, checked: a JSON object whose component entries are
    `[library, class name]` pairs (`[null, null]` for an absent optional one)."""
    path = Path(path)
    if not path.is_dir():
        raise PipelineFolderError(
            f"{path} is not a folder. Pass a diffusers-layout folder (with model_index.json); "
            "loading by hub id and single-file checkpoints are handled by the loaders in lcmkit.loading.",
            path,
        )
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise PipelineFolderError(
            f"{path} has no model_index.json, so it is not a diffusers pipeline folder", path
        )
    try:
        index = read_config_json(index_file)
    except ModelFileError as e:
        raise PipelineFolderError(e.problem, index_file) from None
    _check_index(index, index_file)
    return index


def _check_index(index: dict, index_file: Path) -> None:
    sdxl = [name for name in SDXL_COMPONENTS if _entry_class(index.get(name)) is not None]
    if sdxl or "XL" in str(index.get("_class_name", "")):
        raise PipelineFolderError(
            f"is an SDXL pipeline ({index.get('_class_name')!r}"
            + (f", with {' and '.join(sdxl)}" if sdxl else "")
            + "); lcmkit supports Stable Diffusion 1.x/2.x layouts only",
            index_file,
        )
    for name in COMPONENT_CLASSES:
        if name not in index:
            continue
        entry = index[name]
        pair = isinstance(entry, (list, tuple)) and len(entry) == 2
        if (
            pair
            and (entry[0] is None) == (entry[1] is None)
            and all(v is None or isinstance(v, str) for v in entry)
        ):
            continue
        library, cls_name = COMPONENT_CLASSES[name]
        raise PipelineFolderError(
            f"the `{name}` entry is {_short(entry)}; expected a [library, class name] pair such as "
            f'["{library}", "{cls_name}"], or [null, null] for an absent optional component',
            index_file,
        )
    flag = index.get("requires_safety_checker")
    if flag is not None and not isinstance(flag, bool):
        raise PipelineFolderError(
            f"`requires_safety_checker` must be true or false, got {_short(flag)}", index_file
        )


def _short(value: Any) -> str:
    text = (
        json.dumps(value)
        if isinstance(value, (list, dict, str, int, float, bool, type(None)))
        else repr(value)
    )
    return text if len(text) <= 80 else text[:77] + "..."


def _entry_class(entry: Any) -> str | None:
    """Class name from a model_index entry `[library, class]`; None for an absent optional component."""
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], str):
        return entry[1]
    return None


def _load_one(
    name: str, cls_name: str, folder: Path, torch_dtype: torch.dtype | None, variant: str | None
) -> Any:
    if not folder.is_dir():
        raise MissingFolderError(
            f"model_index.json lists `{name}` ({cls_name}) but {folder} does not exist", folder
        )
    allowed = LOADABLE.get(name)
    if allowed is not None and not _loadable(cls_name, allowed):
        raise PipelineFolderError(
            f"`{name}` is a {cls_name!r}, which lcmkit cannot load as the {name} (supported: "
            f"{', '.join(repr(a) for a in allowed)})",
            folder.parent / "model_index.json",
        )
    try:
        return _load_component(name, cls_name, folder, torch_dtype, variant)
    except ModelFileError as e:
        raise e.with_path(folder) from None
    except FileNotFoundError as e:
        raise MissingModelFileError(one_line(str(e)), folder) from e
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:  # transformers' own errors
        raise ModelFileError(f"cannot be loaded as the {name} ({cls_name}): {describe(e)}", folder) from e


def _load_component(
    name: str, cls_name: str, folder: Path, torch_dtype: torch.dtype | None, variant: str | None
) -> Any:
    if name == "unet":
        return UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch_dtype, variant=variant)
    if name == "vae":
        if cls_name == "AutoencoderTiny":
            return AutoencoderTiny.from_pretrained(folder, torch_dtype=torch_dtype, variant=variant)
        return AutoencoderKL.from_pretrained(folder, torch_dtype=torch_dtype, variant=variant)
    if name == "text_encoder":
        return load_text_encoder(folder, dtype=torch_dtype, variant=variant)
    if name == "tokenizer":
        return load_tokenizer(folder)
    if name == "scheduler":
        if cls_name != "LCMScheduler":
            logger.info("folder has a %s config; building an LCMScheduler from it", cls_name)
        return LCMScheduler.from_pretrained(folder)
    if name == "safety_checker":
        return SafetyChecker.from_pretrained(folder, dtype=torch_dtype, variant=variant)
    if name == "feature_extractor":
        return load_feature_extractor(folder)
    raise PipelineFolderError(f"component `{name}` ({cls_name}) is not supported by lcmkit", folder)


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
                    f"has no `{name}` component, which the pipeline needs", path / "model_index.json"
                )
            components[name] = None
            continue
        if name == "image_encoder":
            logger.warning(
                "ignoring the folder's image_encoder: load_ip_adapter loads the adapter's own encoder"
            )
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
