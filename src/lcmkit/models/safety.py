"""The Stable Diffusion safety checker: a CLIP image embedding compared with fixed "concept" embeddings.

Weights and config are those of diffusers' ``StableDiffusionSafetyChecker`` (a transformers ``CLIPConfig``; a
``CLIPVisionModel`` under ``vision_model``; ``visual_projection``; 17 concept and 3 special-care embeddings with
one threshold each), so a diffusers ``safety_checker/`` folder loads without renaming. The decision rule is the
reference's: per concept, ``round(cos − threshold + adjustment, 3) > 0`` flags the image, where ``adjustment`` is
0.01 once any special-care concept scored above its own threshold.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPConfig, CLIPVisionModel

from lcmkit.io.images import numpy_to_pil, postprocess

if TYPE_CHECKING:  # importing it at run time logs a torchvision warning; only loading needs it
    from transformers import CLIPImageProcessor

logger = logging.getLogger(__name__)

NUM_CONCEPTS = 17
NUM_SPECIAL_CARE = 3
SPECIAL_CARE_ADJUSTMENT = 0.01

# Published checkpoints (saved with transformers 4.x) nest the vision transformer twice:
# ``vision_model.vision_model.encoder...``. transformers 5.x dropped the inner level in memory. We read either
# and always write the nested form, which both transformers generations (and so diffusers) load.
_NESTED = "vision_model.vision_model."
_FLAT = "vision_model."
# Non-persistent buffers that older transformers stored in checkpoints; rebuilt, never loaded.
_IGNORED_SUFFIXES = ("position_ids",)

ImagesLike = torch.Tensor | np.ndarray | list


def _cosine(image_embeds: torch.Tensor, concept_embeds: torch.Tensor) -> np.ndarray:
    """(N, D) × (K, D) → (N, K) cosine similarities as float32 on the CPU (bfloat16-safe, as the reference)."""
    sims = torch.mm(F.normalize(image_embeds), F.normalize(concept_embeds).t())
    return sims.cpu().float().numpy()


def _scores(cos: np.ndarray, thresholds: torch.Tensor, adjustment: np.ndarray) -> np.ndarray:
    """``round(cos − threshold + adjustment, 3)`` per image (rows) and concept (columns).

    The reference does this on NumPy scalars: float32 under NumPy 2 (NEP 50), float64 under NumPy 1's
    value-based casting. Computing in the dtype NumPy itself picks for ``float32 − float`` keeps the rounding,
    and so borderline flags, identical under either.
    """
    dtype = (np.float32(0) - 0.0).dtype
    limits = thresholds.detach().cpu().float().numpy().astype(dtype)
    return np.round(cos.astype(dtype) - limits[None, :] + adjustment.astype(dtype)[:, None], 3)


def _black_out(images: ImagesLike, flags: Sequence[bool]) -> ImagesLike:
    """Return ``images`` with flagged entries zeroed; the caller's object is left untouched."""
    if not any(flags):
        return images
    if isinstance(images, torch.Tensor):
        images = images.clone()
    elif isinstance(images, np.ndarray):
        images = images.copy()
    else:
        images = list(images)
    for index, flagged in enumerate(flags):
        if not flagged:
            continue
        if isinstance(images, list):
            item = images[index]
            images[index] = torch.zeros_like(item) if torch.is_tensor(item) else np.zeros_like(item)
        else:
            images[index] = 0
    return images


class SafetyChecker(nn.Module):
    """CLIP-embedding NSFW filter with diffusers' ``StableDiffusionSafetyChecker`` weights and arithmetic."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        vision = config.vision_config
        dim = config.projection_dim
        self.vision_model = CLIPVisionModel(vision)
        self.visual_projection = nn.Linear(vision.hidden_size, dim, bias=False)
        self.concept_embeds = nn.Parameter(torch.ones(NUM_CONCEPTS, dim), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.ones(NUM_SPECIAL_CARE, dim), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.ones(NUM_CONCEPTS), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.ones(NUM_SPECIAL_CARE), requires_grad=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual_projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.visual_projection.weight.device

    @torch.no_grad()
    def detect(self, clip_input: torch.Tensor) -> list[bool]:
        """Flag each image of ``clip_input`` (CLIP-preprocessed pixels, (N, 3, S, S)) as NSFW or not."""
        pooled = self.vision_model(clip_input).pooler_output
        image_embeds = self.visual_projection(pooled)
        special_cos = _cosine(image_embeds, self.special_care_embeds)
        concept_cos = _cosine(image_embeds, self.concept_embeds)

        no_adjustment = np.zeros(len(image_embeds), dtype=np.float32)
        special = _scores(special_cos, self.special_care_embeds_weights, no_adjustment)
        # A special-care hit lowers every concept threshold by 0.01, making the filter stricter for that image.
        adjustment = np.where((special > 0).any(axis=1), SPECIAL_CARE_ADJUSTMENT, 0.0)
        concepts = _scores(concept_cos, self.concept_embeds_weights, adjustment)
        return [bool(hit) for hit in (concepts > 0).any(axis=1)]

    @torch.no_grad()
    def forward(self, clip_input: torch.Tensor, images: ImagesLike) -> tuple[ImagesLike, list[bool]]:
        """Return ``images`` with flagged ones replaced by zeros (black after ``postprocess`` with
        ``do_denormalize=False``), and the per-image flags. Works on tensors, arrays and lists of either."""
        flags = self.detect(clip_input)
        if any(flags):
            logger.warning(
                "Potential NSFW content was detected in one or more images. A black image will be returned instead."
                " Try again with a different prompt and/or seed."
            )
        return _black_out(images, flags), flags

    # ----- loading and saving -------------------------------------------------------------------------------

    def _vision_prefix(self) -> str:
        return _NESTED if hasattr(self.vision_model, "vision_model") else _FLAT

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, dtype: torch.dtype | None = None, variant: str | None = None
    ) -> SafetyChecker:
        """Load a diffusers ``safety_checker/`` folder (config.json + model.safetensors or pytorch_model.bin).

        Every weight must be present (missing keys raise a ValueError naming them); extra keys are logged.
        ``dtype=None`` means float32. The model is built on the meta device and the weights assigned, which
        saves the random initialisation of a 300M-parameter ViT-L.
        """
        folder = Path(folder)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"No config.json in {folder}; pass the '<model>/safety_checker' folder.")
        config = CLIPConfig.from_pretrained(str(folder), local_files_only=True)
        with torch.device("meta"):
            model = cls(config)
        state = model._match_keys(_read_weights(folder, variant), source=folder)
        model.load_state_dict(state, strict=True, assign=True)
        _rebuild_meta_buffers(model)
        return model.to(dtype or torch.float32).eval()

    def _match_keys(self, state: dict[str, torch.Tensor], source: Path | str) -> dict[str, torch.Tensor]:
        """Rename file keys to this module's keys and check names and shapes."""
        prefix = self._vision_prefix()
        renamed: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            for known in (_NESTED, _FLAT):
                if key.startswith(known):
                    key = prefix + key[len(known) :]
                    break
            renamed[key] = tensor
        expected = self.state_dict()
        missing = sorted(set(expected) - set(renamed))
        if missing:
            raise ValueError(f"Safety checker weights in {source} are missing {len(missing)} keys: {missing}")
        unexpected = sorted(k for k in set(renamed) - set(expected) if not k.endswith(_IGNORED_SUFFIXES))
        if unexpected:
            logger.warning(
                "Ignoring %d unexpected safety checker keys in %s: %s", len(unexpected), source, unexpected
            )
        wrong = [
            f"{k}: file {tuple(renamed[k].shape)} vs model {tuple(v.shape)}"
            for k, v in expected.items()
            if renamed[k].shape != v.shape
        ]
        if wrong:
            raise ValueError(f"Safety checker weights in {source} do not fit the config: {wrong}")
        return {k: renamed[k] for k in expected}

    def save_pretrained(self, folder: str | Path) -> None:
        """Write config.json and model.safetensors in the layout diffusers (and transformers 4.x and 5.x) load."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.config)
        config.architectures = ["StableDiffusionSafetyChecker"]
        config.to_json_file(str(folder / "config.json"))
        prefix = self._vision_prefix()
        state = {}
        for key, tensor in self.state_dict().items():
            if key.startswith(prefix):
                key = _NESTED + key[len(prefix) :]
            state[key] = tensor.detach().cpu().contiguous()
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _read_weights(folder: Path, variant: str | None) -> dict[str, torch.Tensor]:
    """Read a component's weights: safetensors first (single or sharded), ``.bin`` only with weights_only=True."""
    infix = f".{variant}" if variant else ""
    single = folder / f"model{infix}.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = folder / f"model.safetensors.index{infix}.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    pickled = folder / f"pytorch_model{infix}.bin"
    if pickled.is_file():
        return torch.load(pickled, map_location="cpu", weights_only=True)
    present = sorted(p.name for p in folder.iterdir() if p.is_file())
    raise FileNotFoundError(
        f"No safety checker weights ({single.name}, {index.name} or {pickled.name}) in {folder}; found {present}."
    )


def _rebuild_meta_buffers(model: nn.Module) -> None:
    """Recreate the non-persistent buffers left on the meta device (CLIP's ``position_ids`` = arange)."""
    for module_name, module in model.named_modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if not buffer.is_meta:
                continue
            if name != "position_ids":
                raise RuntimeError(f"Cannot rebuild buffer {module_name}.{name} left on the meta device.")
            values = torch.arange(buffer.shape[-1], dtype=buffer.dtype).expand(buffer.shape).clone()
            module.register_buffer(name, values, persistent=False)


def load_feature_extractor(folder: str | Path) -> CLIPImageProcessor:
    """Load a diffusers ``feature_extractor/`` folder (preprocessor_config.json) offline."""
    folder = Path(folder)
    if not (folder / "preprocessor_config.json").is_file():
        raise FileNotFoundError(
            f"No preprocessor_config.json in {folder}; pass the '<model>/feature_extractor' folder."
        )
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)


def run_safety_checker(
    safety_checker: SafetyChecker | None,
    feature_extractor: CLIPImageProcessor | None,
    image: torch.Tensor | np.ndarray,
    device: torch.device | str,
    dtype: torch.dtype,
) -> tuple[torch.Tensor | np.ndarray, list[bool] | None]:
    """Check decoded images; return them (flagged ones zeroed) and the flags, or ``(image, None)`` without a checker.

    ``image`` is the VAE output: an (N, 3, H, W) tensor in [-1, 1], or an (N, H, W, 3) array in [0, 1]. The
    checker sees it as PIL images through the CLIP feature extractor, with pixel values cast to ``dtype``.
    """
    if safety_checker is None:
        return image, None
    if feature_extractor is None:
        raise ValueError(
            "A safety checker needs a feature extractor (CLIPImageProcessor); pass one or no checker."
        )
    pil: list[PIL.Image.Image] = postprocess(image, "pil") if torch.is_tensor(image) else numpy_to_pil(image)
    clip_input = feature_extractor(pil, return_tensors="pt").pixel_values.to(device=device, dtype=dtype)
    return safety_checker(clip_input, images=image)
