"""What the text-to-image and image-to-image LCM pipelines share: components, loading, prompt encoding,
the denoising loop, decoding and output.

The loop (`_denoise`) is written out once, as numbered steps; `text2img.py` and `img2img.py` only prepare
their starting latents and timesteps differently.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lcmkit.io.images import postprocess
from lcmkit.io.paging import release_weight_pages
from lcmkit.loading.folders import load_components, save_components
from lcmkit.loading.hub import resolve_pretrained
from lcmkit.loading.lora import LoraLoaderMixin, scale_lora
from lcmkit.loading.single_file import FromSingleFileMixin
from lcmkit.loading.textual_inversion import TextualInversionLoaderMixin
from lcmkit.models.safety import run_safety_checker
from lcmkit.models.text import encode_negative_prompt, encode_prompt
from lcmkit.nn.conv import Prepack, Winograd, set_conv_prepacking, set_conv_winograd
from lcmkit.pipelines.output import StableDiffusionPipelineOutput
from lcmkit.schedulers.lcm_math import guidance_scale_embedding

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
CALLBACK_TENSOR_INPUTS = ("latents", "denoised", "prompt_embeds", "negative_prompt_embeds", "w_embedding")
Generator = torch.Generator | list[torch.Generator] | None


@dataclass
class Conditioning:
    """The text/guidance inputs of one call. `negative_embeds` is None unless classifier-free guidance runs."""

    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None
    w_embedding: torch.Tensor | None
    cfg_scale: float


HUB_KWARGS = ("cache_dir", "local_files_only", "revision", "token", "force_download", "subfolder")


class LCMPipelineBase(LoraLoaderMixin, TextualInversionLoaderMixin, FromSingleFileMixin):
    """Holds the components and everything both LCM pipelines do the same way."""

    _callback_tensor_inputs = list(CALLBACK_TENSOR_INPUTS)
    _optional_components = ["safety_checker", "feature_extractor", "image_encoder"]
    model_cpu_offload_seq = "text_encoder->unet->vae"
    pipeline_class_name = "LatentConsistencyModelPipeline"

    def __init__(
        self,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        unet: Any,
        scheduler: Any,
        safety_checker: Any = None,
        feature_extractor: Any = None,
        image_encoder: Any = None,
        requires_safety_checker: bool = True,
    ) -> None:
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.unet = unet
        self.scheduler = scheduler
        self.safety_checker = safety_checker
        self.feature_extractor = feature_extractor
        self.image_encoder = image_encoder
        self.requires_safety_checker = requires_safety_checker
        if safety_checker is None and requires_safety_checker:
            logger.warning(
                "%s was built without a safety checker; images will not be screened for NSFW content.",
                type(self).__name__,
            )
        if safety_checker is not None and feature_extractor is None:
            raise ValueError(
                "a safety_checker needs a feature_extractor (CLIPImageProcessor) to prepare its input; pass one, "
                "or pass safety_checker=None"
            )
        self._progress_bar_config: dict[str, Any] = {}
        self._guidance_scale = 8.5
        self._clip_skip: int | None = None
        self._cross_attention_kwargs: dict | None = None
        self._num_timesteps = 0
        self._do_cfg = False
        self._weight_paging = True

    # ------------------------------------------------------------------------------------------------------------------
    # Components, loading, saving, devices

    @property
    def components(self) -> dict[str, Any]:
        return {
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "unet": self.unet,
            "scheduler": self.scheduler,
            "safety_checker": self.safety_checker,
            "feature_extractor": self.feature_extractor,
            "image_encoder": self.image_encoder,
        }

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        requires_safety_checker: bool | None = None,
        dtype: torch.dtype | None = None,
        **components: Any,
    ) -> LCMPipelineBase:
        """Load a diffusers-layout folder. Keyword components (`scheduler=...`, `safety_checker=None`) replace the folder's.

        `dtype` is accepted as a synonym of `torch_dtype` (newer diffusers spell it that way).
        """
        torch_dtype = torch_dtype or dtype
        hub_kwargs = {k: components.pop(k) for k in HUB_KWARGS if k in components}
        # components the caller supplies (or disables with None) are not downloaded
        folder = resolve_pretrained(
            pretrained_model_name_or_path, variant=variant, skip_components=tuple(components), **hub_kwargs
        )
        loaded, index = load_components(folder, torch_dtype, variant, components)
        if requires_safety_checker is None:
            requires_safety_checker = bool(index.get("requires_safety_checker", True))
        return cls(**loaded, requires_safety_checker=requires_safety_checker)

    @classmethod
    def from_pipe(cls, pipe: LCMPipelineBase, **overrides: Any) -> LCMPipelineBase:
        """Build this pipeline kind from another one's components, without copying weights."""
        comps = {**pipe.components, **overrides}
        return cls(**comps, requires_safety_checker=pipe.requires_safety_checker)

    def save_pretrained(self, save_directory: str | Path, safe_serialization: bool = True) -> None:
        """Write a diffusers-layout folder (safetensors weights) that diffusers and lcmkit both load."""
        if not safe_serialization:
            raise ValueError("lcmkit writes safetensors only; pickled .bin weights are not written")
        save_components(
            self.components,
            save_directory,
            self.pipeline_class_name,
            extra={"requires_safety_checker": self.requires_safety_checker},
        )

    def _modules(self) -> list[torch.nn.Module]:
        return [
            m
            for m in (self.unet, self.vae, self.text_encoder, self.safety_checker, self.image_encoder)
            if isinstance(m, torch.nn.Module)
        ]

    def to(self, *args: Any, **kwargs: Any) -> LCMPipelineBase:
        """Move every model, like `torch.nn.Module.to` (`pipe.to("cuda")`, `pipe.to(torch.float16)`, both)."""
        for module in self._modules():
            module.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 8

    # ------------------------------------------------------------------------------------------------------------------
    # Switches

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """tqdm options for the step bar, e.g. `disable=True`."""
        self._progress_bar_config = kwargs

    def progress_bar(self, iterable: Any = None, total: int | None = None) -> tqdm:
        return tqdm(iterable, total=total, **self._progress_bar_config)

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU (Si et al., 2023) on the first two up stages; see the UNet for the arithmetic."""
        if self.unet is None:
            raise ValueError("The pipeline must have `unet` for using FreeU.")
        self.unet.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)

    def disable_freeu(self) -> None:
        self.unet.disable_freeu()

    def enable_vae_slicing(self) -> None:
        """Decode one image at a time. Alias of `pipe.vae.enable_slicing()` (the diffusers <= 0.39 pipeline API)."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def enable_weight_paging(self) -> None:
        """Release each model's memory-mapped weight pages after its stage of a call (the default).

        The peak resident memory of a call is then its largest stage (the UNet's weights, or the VAE decode's
        activations) rather than all weights plus the decode. Released pages stay in the OS page cache and are read
        back on the next call (about 0.1 s per GB). Only unmodified file pages are released: see
        `lcmkit.io.paging`. Weights that are not memory-mapped (cast, moved, trained) are not affected.
        """
        self._weight_paging = True

    def disable_weight_paging(self) -> None:
        """Keep every model's weights resident between stages and calls."""
        self._weight_paging = False

    @property
    def weight_paging(self) -> bool:
        return self._weight_paging

    def set_conv_prepacking(self, mode: Prepack) -> None:
        """How the UNet's and VAE's 3x3 convolutions use oneDNN-packed weights at small sizes (`lcmkit.nn.conv`).

        "auto" (the default): pack memory-mapped weights, whose file pages are released in exchange, so packing
        costs no memory; "always": pack in-memory weights too (fused LoRA, converted checkpoints), a copy of each;
        "off": the plain `F.conv2d` path everywhere (also no convolution summed straight into a residual,
        `Conv2d.add_into`).
        """
        for model in self._conv_models():
            set_conv_prepacking(model, mode)

    def set_conv_winograd(self, mode: Winograd) -> None:
        """Where the UNet's and VAE's 3x3 convolutions take NNPACK's Winograd path (`lcmkit.nn.conv`).

        "auto" (the default): on the CPU in float32, for maps of at least 96x96 pixels with at least 256 channels,
        where it measured faster than oneDNN (the SD decoder at 512² 10.6 -> 9.9 s on a 2-core AVX-512 VM); the
        VAE runs those levels in plain NCHW. It rounds differently from a direct convolution (about 1e-5 relative).
        "always": every eligible convolution, at any size; "off": never.
        """
        for model in self._conv_models():
            set_conv_winograd(model, mode)

    def _conv_models(self) -> list[torch.nn.Module]:
        """The UNet and the VAE, where they are torch modules (an OpenVINO stand-in is not): what the conv switches
        reach."""
        return [model for model in (self.unet, self.vae) if isinstance(model, torch.nn.Module)]

    def _page_out(self, *modules: Any) -> None:
        if self._weight_paging:
            release_weight_pages(*modules)

    def enable_vae_tiling(self) -> None:
        """Encode/decode in overlapping tiles. Alias of `pipe.vae.enable_tiling()`."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

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
    # Shared steps

    def _check_common_inputs(
        self,
        prompt: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        output_type: str,
        callback_on_step_end_tensor_inputs: Sequence[str],
        num_images_per_prompt: int,
        num_inference_steps: int | None,
        timesteps: list[int] | None,
    ) -> None:
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has {bad}, which are not callback inputs; "
                f"allowed: {self._callback_tensor_inputs}"
            )
        if prompt is not None and prompt_embeds is not None:
            raise ValueError(
                "Cannot forward both `prompt` and `prompt_embeds`: pass one of them (prompt_embeds replaces the text encoder)"
            )
        if prompt is None and prompt_embeds is None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`; both are None")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise ValueError(f"`prompt` has to be of type `str` or `list` but is {type(prompt)}")
        if isinstance(prompt, list) and not all(isinstance(p, str) for p in prompt):
            raise ValueError("every entry of a `prompt` list must be a str")
        if prompt_embeds is not None and prompt_embeds.ndim != 3:
            raise ValueError(
                f"`prompt_embeds` must be (batch, tokens, dim), got shape {tuple(prompt_embeds.shape)}"
            )
        if output_type not in OUTPUT_TYPES:
            # diffusers warns and falls back to "np"; a typo silently changing the return type helps nobody
            raise ValueError(f"unknown output_type {output_type!r}; allowed: {list(OUTPUT_TYPES)}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive int, got {num_images_per_prompt!r}")
        if timesteps is None and (not isinstance(num_inference_steps, int) or num_inference_steps < 1):
            raise ValueError(f"`num_inference_steps` must be a positive int, got {num_inference_steps!r}")

    def _batch_size(self, prompt: str | list[str] | None, prompt_embeds: torch.Tensor | None) -> int:
        if isinstance(prompt, str):
            return 1
        if isinstance(prompt, list):
            return len(prompt)
        return prompt_embeds.shape[0]

    @staticmethod
    def _check_generator(generator: Generator, batch: int) -> None:
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(
                f"You have passed a list of generators of length {len(generator)}, but requested an effective batch "
                f"size of {batch} (prompts x num_images_per_prompt). Make sure the batch size matches the length of "
                "the generators."
            )

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
        batch = self._batch_size(prompt, prompt_embeds)
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

    def _predict(self, x_t: torch.Tensor, t: torch.Tensor, state: dict, cfg_scale: float) -> torch.Tensor:
        """The UNet's raw prediction, with classifier-free guidance eps_u + s (eps_c - eps_u) when a negative is set."""
        negative, w_embedding = state["negative_prompt_embeds"], state["w_embedding"]
        if negative is None:
            return self.unet(
                x_t,
                t,
                timestep_cond=w_embedding,
                encoder_hidden_states=state["prompt_embeds"],
                cross_attention_kwargs=self._cross_attention_kwargs,
                return_dict=False,
            )[0]
        pred = self.unet(
            torch.cat([x_t, x_t]),
            t,
            timestep_cond=None if w_embedding is None else torch.cat([w_embedding, w_embedding]),
            encoder_hidden_states=torch.cat([negative, state["prompt_embeds"]]),
            cross_attention_kwargs=self._cross_attention_kwargs,
            return_dict=False,
        )[0]
        uncond, cond = pred.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

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
    ) -> torch.Tensor:
        """The LCM multistep sampler (Luo et al. 2023, Alg. 3). Returns the last consistency estimate `denoised`."""
        self._num_timesteps = len(timesteps)
        self._do_cfg = cond.negative_embeds is not None
        state = {
            "latents": latents,
            "prompt_embeds": cond.prompt_embeds,
            "negative_prompt_embeds": cond.negative_embeds,
            "w_embedding": cond.w_embedding,
            "denoised": None,
        }
        with self.progress_bar(total=len(timesteps)) as bar:
            for i, t in enumerate(timesteps):
                # 1. the consistency function's raw prediction at (x_t, t, w, c)
                x_t = state["latents"].to(state["prompt_embeds"].dtype)
                model_pred = self._predict(x_t, t, state, cond.cfg_scale)
                # 2. x0 estimate with the boundary scalings, then re-noise to the next timestep (not after the last)
                state["latents"], state["denoised"] = self.scheduler.step(
                    model_pred, t, x_t, generator=generator, return_dict=False
                )
                # 3. user hook: may read and replace any of the tensors it asked for
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
        self._page_out(self.unet)
        return state["denoised"].to(state["prompt_embeds"].dtype)

    def _decode(
        self,
        denoised: torch.Tensor,
        output_type: str,
        device: torch.device,
        dtype: torch.dtype,
        return_dict: bool,
    ) -> StableDiffusionPipelineOutput | tuple:
        """VAE-decode the consistency estimate, screen it, convert to the requested type."""
        if output_type == "latent":
            image, has_nsfw = denoised, None
        else:
            image = self.vae.decode(denoised / self.vae.config.scaling_factor, return_dict=False)[0]
            self._page_out(self.vae)
            image, has_nsfw = run_safety_checker(
                self.safety_checker, self.feature_extractor, image, device, dtype
            )
            self._page_out(self.safety_checker)
        do_denormalize = [True] * image.shape[0] if has_nsfw is None else [not flag for flag in has_nsfw]
        image = postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
        if not return_dict:
            return image, has_nsfw
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw)

    def _set_call_state(
        self, guidance_scale: float, clip_skip: int | None, cross_attention_kwargs: dict | None
    ) -> None:
        self._guidance_scale = guidance_scale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs

    @staticmethod
    def _pop_legacy_callback(kwargs: dict) -> tuple[Callable | None, int]:
        callback = kwargs.pop("callback", None)
        steps = kwargs.pop("callback_steps", None)
        if kwargs:
            raise TypeError(f"unexpected keyword arguments: {sorted(kwargs)}")
        if callback is not None or steps is not None:
            warnings.warn(
                "`callback` and `callback_steps` are deprecated; use `callback_on_step_end`",
                FutureWarning,
                stacklevel=3,
            )
        if steps is not None and (not isinstance(steps, int) or steps <= 0):
            raise ValueError(f"`callback_steps` has to be a positive integer but is {steps!r}")
        return callback, steps or 1

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
