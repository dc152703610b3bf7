"""Text-to-image LCM sampling (diffusers `LatentConsistencyModelPipeline` contract)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lcmkit.pipelines.checks import Generator, check_generator, pop_legacy_callback
from lcmkit.pipelines.common import LCMPipelineBase
from lcmkit.pipelines.control import control_image_size
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
        check_generator(generator, batch_size)
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
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        control_image: Any = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        guess_mode: bool = False,
        image: Any = None,
        **kwargs: Any,
    ) -> StableDiffusionPipelineOutput | tuple:
        """Text to image. With a ControlNet set (`controlnet=` at load, or `pipe.controlnet`), `control_image`
        (or `image`, diffusers' ControlNet pipeline's name) holds its image(s), one per net; the output takes the
        first control image's size unless `height`/`width` are given (see `lcmkit.pipelines.control`)."""
        legacy_callback, legacy_steps = pop_legacy_callback(kwargs)
        num_inference_steps, timesteps, guidance_scale = self._use_preset(
            preset, num_inference_steps, timesteps, guidance_scale
        )
        if image is not None and control_image is not None:
            raise ValueError("pass the ControlNet image as `control_image` or as `image`, not both")
        control_image = control_image if control_image is not None else image
        if self._controlnets and control_image is not None and latents is None:
            # as diffusers' ControlNet pipeline: the size of the (first) control image, unless given
            first = control_image
            while len(self._controlnets) > 1 and isinstance(first, (list, tuple)) and first:
                first = first[0]  # the first net's image (or, nested, the first prompt's)
            size = control_image_size(first, self.vae_scale_factor)
            height, width = height or size[0], width or size[1]
        # sizes default to the UNet's sample size in pixels
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        if height % 8 != 0 or width % 8 != 0:
            raise ValueError(f"`height` and `width` have to be divisible by 8 but are {height} and {width}.")

        def start_latents(
            schedule: torch.Tensor, batch: int, dtype: torch.dtype, device: torch.device
        ) -> torch.Tensor:
            channels = self.unet.config.in_channels
            return self.prepare_latents(batch, channels, height, width, dtype, device, generator, latents)

        return self._run(
            prompt=prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt=negative_prompt,
            negative_prompt_embeds=negative_prompt_embeds,
            guidance_scale=guidance_scale,
            negative_guidance_scale=negative_guidance_scale,
            num_images_per_prompt=num_images_per_prompt,
            num_inference_steps=num_inference_steps,
            original_inference_steps=original_inference_steps,
            timesteps=timesteps,
            generator=generator,
            output_type=output_type,
            return_dict=return_dict,
            cross_attention_kwargs=cross_attention_kwargs,
            clip_skip=clip_skip,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            legacy_callback=legacy_callback,
            legacy_callback_steps=legacy_steps,
            strength=1.0,
            start_latents=start_latents,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            control=dict(
                control_image=control_image,
                controlnet_conditioning_scale=controlnet_conditioning_scale,
                control_guidance_start=control_guidance_start,
                control_guidance_end=control_guidance_end,
                guess_mode=guess_mode,
            ),
        )
