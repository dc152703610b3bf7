"""lcmkit: Latent Consistency Model pipelines, models and tools in plain PyTorch.

Public names load lazily so that `import lcmkit` stays cheap (transformers is imported on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LatentConsistencyModelPipeline": "lcmkit.pipelines.text2img",
    "LatentConsistencyModelImg2ImgPipeline": "lcmkit.pipelines.img2img",
    "StableDiffusionPipelineOutput": "lcmkit.pipelines.output",
    "LCMScheduler": "lcmkit.schedulers.lcm",
    "UNet2DConditionModel": "lcmkit.models.unet",
    "ControlNetModel": "lcmkit.loading.controlnet",
    "ControlNetConfig": "lcmkit.config",
    "load_controlnet": "lcmkit.loading.controlnet",
    "AutoencoderKL": "lcmkit.models.vae",
    "AutoencoderTiny": "lcmkit.models.tiny_vae",
    "TinyVAEConfig": "lcmkit.models.tiny_vae",
    "SafetyChecker": "lcmkit.models.safety",
    "ModelFileError": "lcmkit.io.errors",
    "UNetConfig": "lcmkit.config",
    "VAEConfig": "lcmkit.config",
    "FastPaths": "lcmkit.runtime",
    "sample_lcm": "lcmkit.schedulers.sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lcmkit' has no attribute {name!r}")
