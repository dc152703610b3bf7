"""The end of a call: VAE-decode the last consistency estimate, screen it with the safety checker, convert it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lcmkit.io.images import postprocess
from lcmkit.models.safety import run_safety_checker
from lcmkit.pipelines.output import StableDiffusionPipelineOutput


def decode_latents(
    denoised: torch.Tensor,
    vae: Any,
    safety_checker: Any,
    feature_extractor: Any,
    output_type: str,
    device: torch.device,
    dtype: torch.dtype,
    page_out: Callable[[Any], None],
) -> tuple[Any, list[bool] | None]:
    """Images of `output_type` and the NSFW flags (None without a checker, or for latents); flagged images are
    black and not denormalised. `page_out(model)` runs after each model's stage (weight paging)."""
    if output_type == "latent":
        image, has_nsfw = denoised, None
    else:
        image = vae.decode(denoised / vae.config.scaling_factor, return_dict=False)[0]
        page_out(vae)
        image, has_nsfw = run_safety_checker(safety_checker, feature_extractor, image, device, dtype)
        page_out(safety_checker)
    do_denormalize = [True] * image.shape[0] if has_nsfw is None else [not flag for flag in has_nsfw]
    return postprocess(image, output_type=output_type, do_denormalize=do_denormalize), has_nsfw


def pipeline_output(
    image: Any, has_nsfw: list[bool] | None, return_dict: bool
) -> StableDiffusionPipelineOutput | tuple:
    """diffusers' output object, or the `(images, nsfw_content_detected)` tuple."""
    if not return_dict:
        return image, has_nsfw
    return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw)
