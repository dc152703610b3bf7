"""One generation request shared by the CLI, the HTTP server and the web page.

Each front end parses its own input into a `GenerationRequest`; `run_request` turns it into a pipeline call and
returns images with their seeds and the AUTOMATIC1111-style parameter text ("infotext") that PNG-info tools read.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import torch

from lcmkit import __version__

MAX_SEED = 2**32 - 1


@dataclass
class GenerationRequest:
    """What a user asks for. `seed=None` picks a random seed; image i uses seed + i (the A1111 convention)."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 4
    guidance_scale: float = 8.5
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    init_image: PIL.Image.Image | None = None
    strength: float = 0.8
    original_inference_steps: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_img2img(self) -> bool:
        return self.init_image is not None


@dataclass
class GeneratedImage:
    image: PIL.Image.Image
    seed: int
    infotext: str


def resolve_seed(seed: int | None) -> int:
    if seed is None or seed < 0:
        return random.randint(0, MAX_SEED)
    if seed > MAX_SEED:
        raise ValueError(f"seed must be between 0 and {MAX_SEED}, got {seed}")
    return seed


def infotext(
    req: GenerationRequest, seed: int, width: int, height: int, model_name: str | None = None
) -> str:
    """Parameters in the text format AUTOMATIC1111 writes to a PNG's `parameters` chunk."""
    lines = [req.prompt]
    if req.negative_prompt:
        lines.append(f"Negative prompt: {req.negative_prompt}")
    params = [
        ("Steps", req.steps),
        ("Sampler", "LCM"),
        ("CFG scale", _num(req.guidance_scale)),
        ("Seed", seed),
        ("Size", f"{width}x{height}"),
    ]
    if model_name:
        params.append(("Model", model_name))
    if req.is_img2img:
        params.append(("Denoising strength", _num(req.strength)))
    params.append(("Version", f"lcmkit {__version__}"))
    lines.append(", ".join(f"{k}: {v}" for k, v in params))
    return "\n".join(lines)


def _num(x: float) -> str:
    return f"{x:g}"


def run_request(
    pipe: Any,
    req: GenerationRequest,
    model_name: str | None = None,
    callback_on_step_end: Callable | None = None,
) -> list[GeneratedImage]:
    """Run `req` on a text-to-image pipeline (img2img reuses its components through `from_pipe`)."""
    seed = resolve_seed(req.seed)
    seeds = [seed + i for i in range(req.num_images)]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    kwargs: dict[str, Any] = dict(
        num_inference_steps=req.steps,
        guidance_scale=req.guidance_scale,
        num_images_per_prompt=req.num_images,
        generator=generators,
        original_inference_steps=req.original_inference_steps,
        callback_on_step_end=callback_on_step_end,
        **req.extra,
    )
    if req.negative_prompt:
        kwargs["negative_prompt"] = req.negative_prompt
    if req.is_img2img:
        from lcmkit.pipelines.img2img import LatentConsistencyModelImg2ImgPipeline

        runner = LatentConsistencyModelImg2ImgPipeline.from_pipe(pipe)
        runner.set_progress_bar_config(**pipe._progress_bar_config)
        images = runner(req.prompt, image=req.init_image, strength=req.strength, **kwargs).images
    else:
        images = pipe(req.prompt, width=req.width, height=req.height, **kwargs).images
    return [
        GeneratedImage(im, s, infotext(req, s, im.width, im.height, model_name))
        for im, s in zip(images, seeds, strict=True)
    ]
