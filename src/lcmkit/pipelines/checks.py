"""Checks of a pipeline call's inputs, shared by both LCM pipelines: each bad value raises naming what is allowed."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from lcmkit.io.images import OUTPUT_TYPES

CALLBACK_TENSOR_INPUTS = ("latents", "denoised", "prompt_embeds", "negative_prompt_embeds", "w_embedding")
Generator = torch.Generator | list[torch.Generator] | None


def check_common_inputs(
    prompt: str | list[str] | None,
    prompt_embeds: torch.Tensor | None,
    output_type: str,
    callback_on_step_end_tensor_inputs: Sequence[str],
    allowed_callback_inputs: Sequence[str],
    num_images_per_prompt: int,
    num_inference_steps: int | None,
    timesteps: list[int] | None,
) -> None:
    """What text-to-image and image-to-image calls share: prompt or embeddings, output type, counts, callback inputs."""
    bad = [k for k in callback_on_step_end_tensor_inputs if k not in allowed_callback_inputs]
    if bad:
        raise ValueError(
            f"`callback_on_step_end_tensor_inputs` has {bad}, which are not callback inputs; "
            f"allowed: {list(allowed_callback_inputs)}"
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


def prompt_batch_size(prompt: str | list[str] | None, prompt_embeds: torch.Tensor | None) -> int:
    """How many prompts a call has: one string, a list, or the rows of `prompt_embeds`."""
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list):
        return len(prompt)
    return prompt_embeds.shape[0]


def check_generator(generator: Generator, batch: int) -> None:
    """A list of generators needs one per image."""
    if isinstance(generator, list) and len(generator) != batch:
        raise ValueError(
            f"You have passed a list of generators of length {len(generator)}, but requested an effective batch "
            f"size of {batch} (prompts x num_images_per_prompt). Make sure the batch size matches the length of "
            "the generators."
        )


def pop_legacy_callback(kwargs: dict) -> tuple[Callable | None, int]:
    """The deprecated `callback` / `callback_steps` arguments (with a FutureWarning); any other leftover keyword
    is a TypeError, as for any Python function."""
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
