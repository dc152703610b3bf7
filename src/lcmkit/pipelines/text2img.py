"""Text-to-image LCM sampling (diffusers `LatentConsistencyModelPipeline` contract)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lcmkit.pipelines.common import Generator, LCMPipelineBase
from lcmkit.pipelines.output import StableDiffusionPipelineOutput
from lcmkit.schedulers.randn import randn_like_reference


class LatentConsistencyModelPipeline(LCMPipelineBase):
    """Generate images from text in 1-8 steps with an LCM UNet; guidance enters through the w-embedding."""

    pipeline_class_name = "LatentConsistencyModelPipeline"

    def prepare_latents(
        self,
        batch_size: int,
        num_channels_latents: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: Generator,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Initial x_T ~ N(0, I), drawn exactly as diffusers does so that one seed gives one image."""
        shape = (
            batch_size,
            num_channels_latents,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        self._check_generator(generator, batch_size)
        if latents is None:
            latents = randn_like_reference(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(
                    f"`latents` must have shape {shape} for this request, got {tuple(latents.shape)}"
                )
            latents = latents.to(device)
        return latents * self.scheduler.init_noise_sigma

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 4,
        original_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        guidance_scale: float = 8.5,
        num_images_per_prompt: int = 1,
        generator: Generator = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_guidance_scale: float = 1.5,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
        preset: str | None = None,
        **kwargs: Any,
    ) -> StableDiffusionPipelineOutput | tuple:
        legacy_callback, legacy_steps = self._pop_legacy_callback(kwargs)
        num_inference_steps, timesteps, guidance_scale = self._use_preset(
            preset, num_inference_steps, timesteps, guidance_scale
        )
        # 0. sizes default to the UNet's sample size in pixels
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        # 1. check inputs
        if height % 8 != 0 or width % 8 != 0:
            raise ValueError(f"`height` and `width` have to be divisible by 8 but are {height} and {width}.")
        self._check_common_inputs(
            prompt,
            prompt_embeds,
            output_type,
            callback_on_step_end_tensor_inputs,
            num_images_per_prompt,
            num_inference_steps,
            timesteps,
        )
        self._set_call_state(guidance_scale, clip_skip, cross_attention_kwargs)
        batch = self._batch_size(prompt, prompt_embeds) * num_images_per_prompt
        self._check_generator(generator, batch)
        device = self.device
        # 2. text embeddings
        cond = self._conditioning(
            prompt,
            prompt_embeds,
            negative_prompt,
            negative_prompt_embeds,
            guidance_scale,
            negative_guidance_scale,
            num_images_per_prompt,
            clip_skip,
            device,
        )
        prompt_embeds = cond.prompt_embeds
        # 3. timesteps
        schedule = self._set_timesteps(num_inference_steps, device, timesteps, original_inference_steps)
        # 4. initial latents
        latents = self.prepare_latents(
            batch,
            self.unet.config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )
        # 5. the loop, the decode
        denoised = self._denoise(
            latents,
            schedule,
            cond,
            generator,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            legacy_callback,
            legacy_steps,
        )
        return self._decode(denoised, output_type, device, prompt_embeds.dtype, return_dict)
