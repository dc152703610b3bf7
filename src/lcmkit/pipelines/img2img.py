"""Image-to-image LCM sampling (diffusers `LatentConsistencyModelImg2ImgPipeline` contract).

Strength is applied inside the scheduler's `set_timesteps` (it shrinks the skipping-step grid), as the reference does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image
import torch

from lcmkit.io.images import preprocess
from lcmkit.pipelines.checks import Generator, check_generator, pop_legacy_callback
from lcmkit.pipelines.common import LCMPipelineBase
from lcmkit.pipelines.output import StableDiffusionPipelineOutput
from lcmkit.schedulers.randn import randn_like_reference

logger = logging.getLogger(__name__)

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | list


def _posterior_latents(encoded: Any, generator: torch.Generator | None) -> torch.Tensor:
    """z0 from either VAE: a sample of q(z|x) (AutoencoderKL), or the deterministic latents (AutoencoderTiny, which
    draws no random numbers, as in the reference)."""
    if hasattr(encoded, "latent_dist"):
        return encoded.latent_dist.sample(generator)
    return encoded.latents


class LatentConsistencyModelImg2ImgPipeline(LCMPipelineBase):
    """Re-imagine an input image under a prompt in 1-8 steps."""

    pipeline_class_name = "LatentConsistencyModelImg2ImgPipeline"

    def prepare_latents(
        self,
        image: torch.Tensor,
        timestep: torch.Tensor,
        batch_size: int,
        num_images_per_prompt: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: Generator = None,
    ) -> torch.Tensor:
        """x_t = add_noise(z0, eps, t_first), z0 from the VAE posterior (or `image` itself when it has 4 channels).

        Random draws in the reference order: posterior sample(s) first, then the noise.
        """
        image = image.to(device=device, dtype=dtype)
        batch = batch_size * num_images_per_prompt
        check_generator(generator, batch)
        if image.shape[1] == self.vae.config.latent_channels:
            z0 = image
        else:
            if isinstance(generator, list):
                if image.shape[0] < batch:
                    if batch % image.shape[0]:
                        raise ValueError(
                            f"Cannot duplicate `image` of batch size {image.shape[0]} to effective batch_size {batch}"
                        )
                    image = torch.cat([image] * (batch // image.shape[0]), dim=0)
                z0 = torch.cat(
                    [
                        _posterior_latents(self.vae.encode(image[i : i + 1]), generator[i])
                        for i in range(batch)
                    ],
                    dim=0,
                )
            else:
                z0 = _posterior_latents(self.vae.encode(image), generator)
            z0 = self.vae.config.scaling_factor * z0
            self._page_out(self.vae)
        if z0.shape[0] < batch:
            if batch % z0.shape[0]:
                raise ValueError(
                    f"Cannot duplicate `image` of batch size {z0.shape[0]} to {batch} text prompts."
                )
            logger.warning(
                "%d images were requested from %d input image(s); each input image is repeated for its prompts",
                batch,
                z0.shape[0],
            )
            z0 = torch.cat([z0] * (batch // z0.shape[0]), dim=0)
        elif z0.shape[0] > batch:
            raise ValueError(
                f"got {z0.shape[0]} input images for {batch} outputs (prompts x num_images_per_prompt); "
                "pass one image, or one per output"
            )
        noise = randn_like_reference(z0.shape, generator=generator, device=device, dtype=dtype)
        return self.scheduler.add_noise(z0, noise, timestep)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: ImageInput | None = None,
        num_inference_steps: int = 4,
        strength: float = 0.8,
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
        **kwargs: Any,
    ) -> StableDiffusionPipelineOutput | tuple:
        """Image to image. With a ControlNet set, `control_image` holds its image(s), one per net, resized to the
        input image's size (see `lcmkit.pipelines.control`)."""
        legacy_callback, legacy_steps = pop_legacy_callback(kwargs)
        num_inference_steps, timesteps, guidance_scale = self._use_preset(
            preset, num_inference_steps, timesteps, guidance_scale
        )
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"The value of strength should in [0.0, 1.0] but is {strength}")

        def check_image() -> None:
            if image is None and latents is None:
                raise ValueError(
                    "img2img needs an `image` (PIL, numpy array, tensor, or a list of them) or `latents`"
                )

        def start_latents(
            schedule: torch.Tensor, batch: int, dtype: torch.dtype, device: torch.device
        ) -> torch.Tensor:
            """The noised image at the first timestep; `latents`, when given, replace the image (as in the
            reference)."""
            if latents is not None:
                return latents.to(device)
            pixels = preprocess(image, self.vae_scale_factor)
            n = num_images_per_prompt
            return self.prepare_latents(pixels, schedule[:1], batch // n, n, dtype, device, generator)

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
            strength=strength,
            start_latents=start_latents,
            ip_adapter_image=ip_adapter_image,
            ip_adapter_image_embeds=ip_adapter_image_embeds,
            check_more=check_image,
            control=dict(
                control_image=control_image,
                controlnet_conditioning_scale=controlnet_conditioning_scale,
                control_guidance_start=control_guidance_start,
                control_guidance_end=control_guidance_end,
                guess_mode=guess_mode,
            ),
        )

    def get_timesteps(
        self, num_inference_steps: int, strength: float, device: torch.device
    ) -> tuple[torch.Tensor, int]:
        """SD-img2img style truncation, kept for API parity; this pipeline passes `strength` to the scheduler instead."""
        init = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = max(num_inference_steps - init, 0)
        timesteps = self.scheduler.timesteps[t_start * self.scheduler.order :]
        return timesteps, num_inference_steps - t_start
