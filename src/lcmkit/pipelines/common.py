"""What the text-to-image and image-to-image LCM pipelines share: prompt encoding and one run of a call.

`LCMPipelineBase._run` is a call from checked inputs to images, as numbered steps; `text2img.py` and `img2img.py`
hold the signatures and make their starting latents. The pieces live by concern: the components, their loading
and their switches (fast paths too) in `components.py`, input checks in `checks.py`,
classifier-free guidance in `guidance.py`, the sampler in `lcmkit.schedulers.sampling`, decoding and the safety
checker in `decode.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lcmkit.io.images import OUTPUT_TYPES  # noqa: F401  (re-exported: its home was this module)
from lcmkit.loading.ip_adapter import IPAdapterMixin
from lcmkit.loading.lora import LoraLoaderMixin, scale_lora
from lcmkit.loading.single_file import FromSingleFileMixin
from lcmkit.loading.textual_inversion import TextualInversionLoaderMixin
from lcmkit.models.text import encode_negative_prompt, encode_prompt
from lcmkit.pipelines.checks import (
    CALLBACK_TENSOR_INPUTS,
    Generator,
    check_common_inputs,
    check_generator,
    prompt_batch_size,
)
from lcmkit.pipelines.components import HUB_KWARGS, PipelineComponents  # noqa: F401  (HUB_KWARGS re-exported)
from lcmkit.pipelines.control import ControlArgs, ControlRun, check_control_args, prepare_control_image
from lcmkit.pipelines.decode import decode_latents, pipeline_output
from lcmkit.pipelines.guidance import Conditioning, guided_prediction
from lcmkit.pipelines.output import StableDiffusionPipelineOutput
from lcmkit.schedulers.lcm import LCMScheduler
from lcmkit.schedulers.lcm_math import guidance_scale_embedding
from lcmkit.schedulers.sampling import sample_lcm

logger = logging.getLogger(__name__)


class LCMPipelineBase(
    PipelineComponents, LoraLoaderMixin, TextualInversionLoaderMixin, FromSingleFileMixin, IPAdapterMixin
):
    """Everything both LCM pipelines do the same way: prompt encoding, guidance, the sampler, the decode."""

    _callback_tensor_inputs = list(CALLBACK_TENSOR_INPUTS)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """The components, as `PipelineComponents` takes them, and the state of the last call."""
        super().__init__(*args, **kwargs)
        self._guidance_scale = 8.5
        self._clip_skip: int | None = None
        self._cross_attention_kwargs: dict | None = None
        self._num_timesteps = 0
        self._do_cfg = False

    # ------------------------------------------------------------------------------------------------------------------
    # Properties read by callbacks (diffusers exposes the same)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def clip_skip(self) -> int | None:
        return self._clip_skip

    @property
    def cross_attention_kwargs(self) -> dict | None:
        return self._cross_attention_kwargs

    @property
    def do_classifier_free_guidance(self) -> bool:
        """False for plain LCM sampling (guidance is distilled into the w-embedding: one UNet pass per step);
        True while a call runs real classifier-free guidance (negative prompt, or a UNet without w-embedding)."""
        return self._do_cfg

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    # ------------------------------------------------------------------------------------------------------------------
    # Prompt encoding and one run of a call

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        clip_skip: int | None = None,
        lora_scale: float | None = None,
    ) -> torch.Tensor:
        """CLIP text embeddings for the prompt(s), repeated per image; text-encoder LoRA scaled by `lora_scale`."""
        with scale_lora(self.text_encoder, lora_scale):
            return encode_prompt(
                prompt,
                self.tokenizer,
                self.text_encoder,
                device,
                num_images_per_prompt=num_images_per_prompt,
                prompt_embeds=prompt_embeds,
                clip_skip=clip_skip,
                dtype=self._text_dtype(),
                prompt_transform=self._prompt_transform(),
            )

    def encode_negative_prompt(
        self,
        negative_prompt: str | list[str] | None,
        batch_size: int,
        device: torch.device,
        num_images_per_prompt: int = 1,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt: str | list[str] | None = None,
    ) -> torch.Tensor:
        """Embeddings of the unconditional side of classifier-free guidance ("" when no negative prompt is given)."""
        return encode_negative_prompt(
            negative_prompt,
            batch_size,
            self.tokenizer,
            self.text_encoder,
            device,
            num_images_per_prompt=num_images_per_prompt,
            negative_prompt_embeds=negative_prompt_embeds,
            prompt=prompt,
            dtype=self._text_dtype(),
            prompt_transform=self._prompt_transform(),
        )

    def _text_dtype(self) -> torch.dtype:
        return self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype

    def get_guidance_scale_embedding(
        self, w: torch.Tensor, embedding_dim: int = 512, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        return guidance_scale_embedding(w, embedding_dim=embedding_dim, dtype=dtype)

    def _conditioning(
        self,
        prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt: str | list[str] | None,
        negative_prompt_embeds: torch.Tensor | None,
        guidance_scale: float,
        negative_guidance_scale: float,
        num_images_per_prompt: int,
        clip_skip: int | None,
        device: torch.device,
    ) -> Conditioning:
        """What the UNet sees, and how guidance is applied.

        - An LCM UNet (with a w-embedding input) gets w = guidance_scale - 1, embedded (the reference behaviour:
          one UNet pass per step). A negative prompt is an opt-in that adds classifier-free guidance on top, between
          the prompt and the negative prompt, at `negative_guidance_scale`.
        - A UNet without a w-embedding (an SD UNet with an LCM-LoRA) does real classifier-free guidance at
          `guidance_scale` when it is > 1, as diffusers' StableDiffusionPipeline does; the negative prompt defaults to "".
        """
        batch = prompt_batch_size(prompt, prompt_embeds)
        if isinstance(negative_prompt, str) and isinstance(prompt, list):
            negative_prompt = [
                negative_prompt
            ] * batch  # one negative for every prompt (diffusers raises here)
        lora_scale = (self._cross_attention_kwargs or {}).get("scale")
        embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, prompt_embeds, clip_skip, lora_scale
        )
        has_negative = negative_prompt is not None or negative_prompt_embeds is not None
        w_embedding = None
        if self.unet.config.time_cond_proj_dim is not None:
            w = torch.tensor(guidance_scale - 1).repeat(batch * num_images_per_prompt)
            w_embedding = guidance_scale_embedding(w, embedding_dim=self.unet.config.time_cond_proj_dim)
            w_embedding = w_embedding.to(device=device, dtype=embeds.dtype)
            cfg_scale = negative_guidance_scale if has_negative else 1.0
        else:
            cfg_scale = guidance_scale
        negative = None
        if cfg_scale <= 1.0:
            if has_negative:
                logger.warning(
                    "the negative prompt is ignored: classifier-free guidance needs a scale > 1 (got %g)",
                    cfg_scale,
                )
            cfg_scale = 1.0
        else:
            with scale_lora(self.text_encoder, lora_scale):
                negative = self.encode_negative_prompt(
                    negative_prompt, batch, device, num_images_per_prompt, negative_prompt_embeds, prompt
                )
        self._page_out(self.text_encoder)
        return Conditioning(embeds, negative, w_embedding, cfg_scale)

    def _run(
        self,
        *,
        prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt: str | list[str] | None,
        negative_prompt_embeds: torch.Tensor | None,
        guidance_scale: float,
        negative_guidance_scale: float,
        num_images_per_prompt: int,
        num_inference_steps: int,
        original_inference_steps: int | None,
        timesteps: list[int] | None,
        strength: float,
        generator: Generator,
        output_type: str,
        return_dict: bool,
        cross_attention_kwargs: dict | None,
        clip_skip: int | None,
        callback_on_step_end: Callable | None,
        callback_on_step_end_tensor_inputs: Sequence[str],
        legacy_callback: Callable | None,
        legacy_callback_steps: int,
        start_latents: Callable[[torch.Tensor, int, torch.dtype, torch.device], torch.Tensor],
        check_more: Callable[[], None] | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        control: dict[str, Any] | None = None,
    ) -> StableDiffusionPipelineOutput | tuple:
        """One call of either pipeline; `start_latents(schedule, batch, dtype, device)` makes its x_t at the
        first timestep (noise, or the noised image), and `check_more()` checks its own inputs. `control` holds
        the call's ControlNet arguments (`check_control_args`'s keywords)."""
        # 1. check inputs
        check_common_inputs(
            prompt,
            prompt_embeds,
            output_type,
            callback_on_step_end_tensor_inputs,
            self._callback_tensor_inputs,
            num_images_per_prompt,
            num_inference_steps,
            timesteps,
        )
        if check_more is not None:
            check_more()
        self._check_ip_inputs(ip_adapter_image, ip_adapter_image_embeds)
        control_args = self._check_control(control or {})
        self._guidance_scale = guidance_scale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        batch = prompt_batch_size(prompt, prompt_embeds) * num_images_per_prompt
        check_generator(generator, batch)
        device = self.device
        # 2. text embeddings and the w-embedding
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
        if self.ip_adapter_loaded:  # the image prompt, unconditional rows first under guidance
            cond.image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, batch, cond.negative_embeds is not None
            )
        dtype = cond.prompt_embeds.dtype
        # 3. timesteps (img2img: shortened by strength inside the scheduler)
        schedule = self._set_timesteps(
            num_inference_steps, device, timesteps, original_inference_steps, strength
        )
        # 4. starting latents
        latents = start_latents(schedule, batch, dtype, device)
        # 4b. the control images, at the size of the latents
        control_run = None
        if control_args is not None:
            size = tuple(d * self.vae_scale_factor for d in latents.shape[-2:])
            control_run = self._control_run(control_args, size, batch, num_images_per_prompt, len(schedule))
        # 5. the sampler, then the decode
        denoised = self._denoise(
            latents,
            schedule,
            cond,
            generator,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            legacy_callback,
            legacy_callback_steps,
            control_run,
        )
        image, has_nsfw = decode_latents(
            denoised,
            self.vae,
            self.safety_checker,
            self.feature_extractor,
            output_type,
            device,
            dtype,
            self._page_out,
        )
        return pipeline_output(image, has_nsfw, return_dict)

    def _denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        generator: Generator,
        callback_on_step_end: Callable | None,
        callback_tensor_inputs: Sequence[str],
        legacy_callback: Callable | None = None,
        legacy_callback_steps: int = 1,
        control: ControlRun | None = None,
    ) -> torch.Tensor:
        """`sample_lcm` with the UNet (and guidance) as `predict`; the step hooks may read and replace the tensors
        they asked for (the prompt embeddings too: `predict` reads them from the same state)."""
        self._num_timesteps = len(timesteps)
        self._do_cfg = cond.negative_embeds is not None
        state = {
            "latents": latents,
            "prompt_embeds": cond.prompt_embeds,
            "negative_prompt_embeds": cond.negative_embeds,
            "w_embedding": cond.w_embedding,
            "denoised": None,
        }

        def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return guided_prediction(
                self.unet,
                # identity for LCM/TCD/DDIM; Euler divides by sqrt(sigma^2 + 1)
                self.scheduler.scale_model_input(x_t, t),
                t,
                state["prompt_embeds"],
                state["negative_prompt_embeds"],
                state["w_embedding"],
                cond.cfg_scale,
                self._cross_attention_kwargs,
                cond.image_embeds,
                control,
            )

        with self.progress_bar(total=len(timesteps)) as bar:

            def after_step(
                i: int, t: torch.Tensor, x: torch.Tensor, denoised: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
                state["latents"], state["denoised"] = x, denoised
                if callback_on_step_end is not None:
                    out = callback_on_step_end(self, i, t, {k: state[k] for k in callback_tensor_inputs})
                    if not isinstance(out, dict):
                        raise TypeError(
                            f"callback_on_step_end must return a dict, returned {type(out).__name__}"
                        )
                    state.update({k: v for k, v in out.items() if k in state})
                if legacy_callback is not None and i % legacy_callback_steps == 0:
                    legacy_callback(i, t, state["latents"])
                bar.update()
                return state["latents"].to(state["prompt_embeds"].dtype), state["denoised"]

            x_t = latents.to(cond.prompt_embeds.dtype)
            denoised = sample_lcm(
                predict, self.scheduler, x_t, timesteps, generator=generator, callback=after_step
            )
        self._page_out(self.unet, *self._controlnets)
        # LCM decodes its last consistency estimate; other samplers (DDIM, Euler) their last sample, as diffusers.
        final = denoised if isinstance(self.scheduler, LCMScheduler) else state["latents"]
        return final.to(state["prompt_embeds"].dtype)

    def _check_ip_inputs(self, image: Any, embeds: list[torch.Tensor] | None) -> None:
        """An image prompt needs a loaded IP-Adapter, and a loaded one needs an image prompt (one of the two)."""
        given = image is not None or embeds is not None
        if given:
            self._check_exact_mode("use ip_adapter_image")
        if image is not None and embeds is not None:
            raise ValueError("pass either ip_adapter_image or ip_adapter_image_embeds, not both")
        if given and not self.ip_adapter_loaded:
            raise ValueError(
                "ip_adapter_image / ip_adapter_image_embeds need an IP-Adapter: call load_ip_adapter first"
            )
        if self.ip_adapter_loaded and not given:
            raise ValueError(
                "an IP-Adapter is loaded: pass ip_adapter_image= (or ip_adapter_image_embeds=), or call "
                "unload_ip_adapter() (set_ip_adapter_scale(0) keeps it but turns it off)"
            )

    def _check_control(self, control: dict[str, Any]) -> ControlArgs | None:
        """The call's ControlNet arguments, checked (before anything runs); None without a ControlNet."""
        args = check_control_args(
            self._controlnets,
            control.get("control_image"),
            control.get("controlnet_conditioning_scale", 1.0),
            control.get("control_guidance_start", 0.0),
            control.get("control_guidance_end", 1.0),
            control.get("guess_mode", False),
        )
        if args is not None and self._fast_paths.backend == "openvino":
            raise ValueError(
                "ControlNet needs exact mode: the OpenVINO fast mode's UNet graph takes no ControlNet residuals. "
                "Load the pipeline without fast=True / --fast to use a ControlNet"
            )
        return args

    def _control_run(
        self, args: ControlArgs, size: tuple[int, int], batch: int, per_prompt: int, steps: int
    ) -> ControlRun:
        images = [
            prepare_control_image(image, *size, batch // per_prompt, per_prompt, self.device, net.dtype)
            for image, net in zip(args.images, self._controlnets, strict=True)
        ]
        return ControlRun.build(self._controlnets, args, images, steps)

    def _use_preset(
        self, preset: str | None, steps: int, timesteps: list[int] | None, guidance_scale: float
    ) -> tuple[int | None, list[int] | None, float]:
        """`preset=` (see `lcmkit.presets`): put the preset's scheduler on the pipeline (it stays there) and take
        its steps, timesteps and guidance where the call left the defaults (4 steps, guidance 8.5)."""
        if preset is None:
            return steps, timesteps, guidance_scale
        from lcmkit.presets import DEFAULT_GUIDANCE, DEFAULT_STEPS, apply_preset

        given_steps = None if steps == DEFAULT_STEPS else steps
        given_guidance = None if guidance_scale == DEFAULT_GUIDANCE else guidance_scale
        chosen = apply_preset(self, preset, given_steps, given_guidance)
        if timesteps is not None:
            return steps, timesteps, chosen["guidance_scale"]
        return chosen["num_inference_steps"], chosen["timesteps"], chosen["guidance_scale"]

    def _set_timesteps(
        self,
        num_inference_steps: int | None,
        device: torch.device,
        timesteps: list[int] | None,
        original_inference_steps: int | None,
        strength: float = 1.0,
    ) -> torch.Tensor:
        if timesteps is not None:
            self.scheduler.set_timesteps(
                device=device,
                original_inference_steps=original_inference_steps,
                timesteps=timesteps,
                strength=strength,
            )
        else:
            self.scheduler.set_timesteps(
                num_inference_steps,
                device=device,
                original_inference_steps=original_inference_steps,
                strength=strength,
            )
        return self.scheduler.timesteps
