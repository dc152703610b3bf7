"""One generation request shared by the CLI, the HTTP server and the web page.

Each front end parses its own input into a `GenerationRequest`; `run_request` turns it into a pipeline call and
returns images with their seeds and the AUTOMATIC1111-style parameter text ("infotext") that PNG-info tools read.
"""

from __future__ import annotations

import inspect
import math
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import PIL.Image

from lcmkit import __version__
from lcmkit.control import ControlUnit, control_call_kwargs

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
    # one entry per ControlNet of the pipeline, in its order (None: that net is off for this request); the server
    # fills it, the CLI passes its control arguments in `extra` instead (its nets are exactly its units)
    controls: tuple[ControlUnit | None, ...] = ()

    @property
    def is_img2img(self) -> bool:
        return self.init_image is not None


@dataclass
class GeneratedImage:
    image: PIL.Image.Image
    seed: int
    infotext: str


def resolve_seeds(seed: int | None, count: int = 1) -> list[int]:
    """The seeds of `count` images: `seed, seed + 1, ...` (the A1111 convention), from a random start when `seed`
    is None or negative (A1111 sends -1).

    This is the one place seeds are decided (the CLI, `run_request` and the server's worker all call it), so every
    seed written into an infotext is one that A1111 and lcmkit accept back: all of them stay within
    0..MAX_SEED, a random start leaves room for the whole run, and a given start that does not is refused.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"the number of images must be a positive integer, got {count!r}")
    if count - 1 > MAX_SEED:
        raise ValueError(f"at most {MAX_SEED + 1} images can have distinct seeds, got {count}")
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and seed < 0):
        start = random.randint(0, MAX_SEED - count + 1)
    elif isinstance(seed, bool) or not isinstance(seed, int) or seed + count - 1 > MAX_SEED:
        last = MAX_SEED - count + 1
        what = "" if count == 1 else f" for {count} images (image i uses seed + i)"
        raise ValueError(f"seed must be an integer between -1 (random) and {last}{what}, got {seed!r}")
    else:
        start = seed
    return list(range(start, start + count))


def resolve_seed(seed: int | None) -> int:
    """One image's seed; see `resolve_seeds`."""
    return resolve_seeds(seed, 1)[0]


# Option values from untyped sources (command line strings, JSON lines). Each parser raises a ValueError that says
# what was wrong and what is allowed; front ends add where (which option, which line).


def parse_int(value: Any, what: str, low: int, high: int | None = None) -> int:
    ok = isinstance(value, int | str) and not isinstance(value, bool)
    try:
        n = int(value) if ok else None
    except ValueError:
        n = None
    if n is None or n < low or (high is not None and n > high):
        allowed = f"at least {low}" if high is None else f"from {low} to {high}"
        raise ValueError(f"{what} must be an integer {allowed}, got {value!r}")
    return n


def parse_float(value: Any, what: str, low: float | None = None, high: float | None = None) -> float:
    """A finite number; with bounds, `low < x <= high`."""
    ok = isinstance(value, int | float | str) and not isinstance(value, bool)
    try:
        x = float(value) if ok else None
    except ValueError:
        x = None
    if x is None or not math.isfinite(x) or (low is not None and x <= low) or (high is not None and x > high):
        allowed = (
            "a number" if low is None or high is None else f"a number above {low:g} and at most {high:g}"
        )
        raise ValueError(f"{what} must be {allowed}, got {value!r}")
    return x


def parse_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {value!r}")
    return value


def parse_side(value: Any, what: str = "width and height") -> int:
    n = parse_int(value, what, 8)
    if n % 8:
        raise ValueError(f"{what} must be a multiple of 8 (the VAE downsamples by 8), got {n}")
    return n


def parse_size(text: Any) -> tuple[int, int]:
    """`WIDTHxHEIGHT`, both multiples of 8."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"size must be WIDTHxHEIGHT such as 512x512, got {text!r}")
    return parse_side(match[1], "size width"), parse_side(match[2], "size height")


def parse_seed(value: Any) -> int | None:
    """-1 means random (None), as in AUTOMATIC1111."""
    seed = parse_int(value, "seed", -1, MAX_SEED)
    return None if seed == -1 else seed


OPTION_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "prompt": ("prompt", lambda v: parse_text(v, "prompt")),
    "negative_prompt": ("negative_prompt", lambda v: parse_text(v, "negative_prompt")),
    "steps": ("steps", lambda v: parse_int(v, "steps", 1)),
    "guidance": ("guidance_scale", lambda v: parse_float(v, "guidance")),
    "seed": ("seed", parse_seed),
    "n": ("num_images", lambda v: parse_int(v, "n", 1)),
    "strength": ("strength", lambda v: parse_float(v, "strength", 0.0, 1.0)),
    "width": ("width", lambda v: parse_side(v, "width")),
    "height": ("height", lambda v: parse_side(v, "height")),
}
OPTION_KEYS = sorted([*OPTION_FIELDS, "size"])


def apply_options(req: GenerationRequest, options: Mapping[str, Any]) -> GenerationRequest:
    """A copy of `req` with short-named options (a JSON line of a batch file) applied; `size` is "WxH"."""
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; allowed: {OPTION_KEYS}")
    changes = {attr: parse(options[key]) for key, (attr, parse) in OPTION_FIELDS.items() if key in options}
    if "size" in options:
        changes["width"], changes["height"] = parse_size(options["size"])
    if not changes.get("prompt", req.prompt).strip():
        raise ValueError("prompt must be a non-empty string")
    return replace(req, **changes)


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
    if req.extra.get("preset"):
        params.append(("Preset", req.extra["preset"]))
    if req.extra.get("clip_skip"):  # A1111 counts the last layer as 1: diffusers' clip_skip k is its k + 1
        params.append(("Clip skip", req.extra["clip_skip"] + 1))
    used = [u for u in req.controls if u is not None]
    params += [(f"ControlNet {i}", f'"{control_infotext(u)}"') for i, u in enumerate(used)]
    params.append(("Version", f"lcmkit {__version__}"))
    lines.append(", ".join(f"{k}: {v}" for k, v in params))
    return "\n".join(lines)


def _num(x: float) -> str:
    return f"{x:g}"


_UNSAFE = re.compile(r'[,:"\n]')  # would end an infotext field or its quoted value


def control_infotext(unit: ControlUnit) -> str:
    """One ControlNet unit as sd-webui-controlnet writes it into the infotext (its `ControlNet N` value), without
    the commas and colons that would break the format."""
    module = unit.module or ("canny" if unit.kind == "canny" else "none")
    fields = [("Module", module), ("Model", unit.model or unit.source), ("Weight", _num(unit.scale))]
    if module == "canny":
        fields += [("Threshold A", _num(unit.low)), ("Threshold B", _num(unit.high))]
    fields += [
        ("Guidance Start", _num(unit.start)),
        ("Guidance End", _num(unit.end)),
        ("Control Mode", "Balanced"),
    ]
    return ", ".join(f"{k}: {_UNSAFE.sub(' ', str(v))}" for k, v in fields)


def _nets(pipe: Any) -> int:
    """How many ControlNets `pipe` runs (0 for a pipeline without the attribute, such as a test double)."""
    from torch import nn

    nets = getattr(pipe, "controlnet", None)
    if isinstance(nets, list | tuple):
        return sum(isinstance(net, nn.Module) for net in nets)
    return int(isinstance(nets, nn.Module))


def _size(pipe: Any, req: GenerationRequest) -> tuple[int | None, int | None]:
    """The call's width and height: the request's; with ControlNets set, the model's own size where the request
    gives none (the pipeline would otherwise take the size of a control image)."""
    if not _nets(pipe) or (req.width and req.height):
        return req.width, req.height
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return req.width or native, req.height or native


def _control_kwargs(pipe: Any, req: GenerationRequest) -> dict[str, Any]:
    """`req.controls` as the call's ControlNet arguments, one entry per net of `pipe` (the missing ones off)."""
    nets = _nets(pipe)
    if "control_image" in req.extra or (not nets and not req.controls):
        return {}
    if len(req.controls) > nets:
        raise ValueError(
            f"the request has {len(req.controls)} control units; the pipeline has {nets} ControlNet(s)"
        )
    return control_call_kwargs([*req.controls, *[None] * (nets - len(req.controls))])


def _call_kwargs(runner: Any, req: GenerationRequest, generators: list, callback: Callable | None) -> dict:
    """The pipeline arguments every image of `req` shares (not the prompt, image or size)."""
    kwargs: dict[str, Any] = dict(
        num_inference_steps=req.steps,
        guidance_scale=req.guidance_scale,
        generator=generators,
        original_inference_steps=req.original_inference_steps,
        callback_on_step_end=callback,
        **req.extra,
        **_control_kwargs(runner, req),
    )
    if req.negative_prompt:
        if "negative_prompt" not in inspect.signature(runner.__call__).parameters:
            raise ValueError(
                "this pipeline takes no negative prompt: LCM distils guidance into the w-embedding (no CFG pass), "
                "so leave the negative prompt empty"
            )
        kwargs["negative_prompt"] = req.negative_prompt
    return kwargs


def run_request(
    pipe: Any,
    req: GenerationRequest,
    model_name: str | None = None,
    callback_on_step_end: Callable | None = None,
) -> list[GeneratedImage]:
    """Run `req` on a text-to-image pipeline (img2img reuses its components through `from_pipe`)."""
    import torch

    seeds = resolve_seeds(req.seed, req.num_images)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    runner = pipe
    if req.is_img2img:
        from lcmkit.pipelines.img2img import LatentConsistencyModelImg2ImgPipeline

        runner = LatentConsistencyModelImg2ImgPipeline.from_pipe(pipe)
        runner.set_progress_bar_config(**pipe._progress_bar_config)
    kwargs = _call_kwargs(runner, req, generators, callback_on_step_end)
    kwargs["num_images_per_prompt"] = req.num_images
    if req.is_img2img:
        images = runner(req.prompt, image=req.init_image, strength=req.strength, **kwargs).images
    else:
        width, height = _size(pipe, req)
        images = pipe(req.prompt, width=width, height=height, **kwargs).images
    return [
        GeneratedImage(im, s, infotext(req, s, im.width, im.height, model_name))
        for im, s in zip(images, seeds, strict=True)
    ]


def batch_key(req: GenerationRequest) -> tuple | None:
    """What text-to-image requests must share to run as one pipeline call (`run_batch`): everything but the
    prompt, negative prompt text, seed and image count. None for img2img, which is never batched. Whether a
    negative prompt is given is part of the key: the pipeline encodes "no negative prompt" differently from
    an empty one, so requests with and without one are not mixed. Requests with images beside the prompt (a
    ControlNet unit, an IP-Adapter image in `extra`) are never batched either."""
    if req.is_img2img or any(u is not None for u in req.controls):
        return None
    if any(isinstance(v, PIL.Image.Image | list | tuple) for v in req.extra.values()):
        return None
    return (
        req.width,
        req.height,
        req.steps,
        req.guidance_scale,
        req.original_inference_steps,
        bool(req.negative_prompt),
        req.extra,
    )


def run_batch(
    pipe: Any,
    reqs: list[GenerationRequest],
    model_name: str | None = None,
    callback_on_step_end: Callable | None = None,
) -> list[list[GeneratedImage]]:
    """Run text-to-image requests with one `batch_key` as ONE pipeline call (one UNet batch); the images of each.

    Every image gets its own generator seeded from its request's seeds, so its starting noise is the one it has
    when its request runs alone (`run_request`); only the batched matrix products round differently.
    """
    import torch

    key = batch_key(reqs[0])
    if key is None or any(batch_key(r) != key for r in reqs):
        raise ValueError(
            "run_batch takes text-to-image requests that differ only in prompts, seeds and counts"
        )
    seeds = [resolve_seeds(r.seed, r.num_images) for r in reqs]
    generators = [torch.Generator().manual_seed(s) for group in seeds for s in group]
    first = reqs[0]
    kwargs = _call_kwargs(pipe, first, generators, callback_on_step_end)
    if first.negative_prompt:
        kwargs["negative_prompt"] = [r.negative_prompt for r in reqs for _ in range(r.num_images)]
    prompts = [r.prompt for r in reqs for _ in range(r.num_images)]
    width, height = _size(pipe, first)
    images = pipe(prompts, width=width, height=height, num_images_per_prompt=1, **kwargs).images
    results, start = [], 0
    for r, group in zip(reqs, seeds, strict=True):
        mine = images[start : start + len(group)]
        start += len(group)
        results.append(
            [
                GeneratedImage(im, s, infotext(r, s, im.width, im.height, model_name))
                for im, s in zip(mine, group, strict=True)
            ]
        )
    return results
