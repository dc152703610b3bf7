"""Request bodies of the two HTTP dialects we speak, and their translation to one `GenerationRequest`.

OpenAI images API (`/v1/images/generations`) and AUTOMATIC1111's web UI API (`/sdapi/v1/txt2img`, `img2img`).
A1111 fields are all declared, so that each one lcmkit cannot honour is refused or warned about rather than silently
dropped (`lcmkit.server.a1111`); fields A1111 does not know are ignored, as A1111 does. OpenAI fields are checked
the same way, unknown ones included (`lcmkit.server.openai_api`). Defaults differ from A1111 where LCM needs it: 4 steps (not 50) and CFG 8.5 (not 7); the size
defaults to the model's native size (not 512).
"""

from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import PIL.Image
from PIL.PngImagePlugin import PngInfo
from pydantic import ConfigDict, Field

from lcmkit import __version__
from lcmkit.request import GeneratedImage, GenerationRequest
from lcmkit.server import a1111, controlnet, images
from lcmkit.server.compat import Review
from lcmkit.server.guards import RequestBody, check_text_lengths
from lcmkit.server.jobs import LimitError, Settings, check_limits

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


class OpenAIImageRequest(RequestBody):
    """`POST /v1/images/generations`. `model` must be absent or the served model; the last four fields are ours.

    Fields OpenAI does not define are kept (`extra="allow"`) so that `lcmkit.server.openai_api` can report them as
    OpenAI does ("Unrecognized request argument supplied"), as can the OpenAI fields lcmkit does not honour.
    """

    model_config = ConfigDict(extra="allow")

    prompt: str
    model: str | None = None
    n: int | None = 1
    size: str | None = Field(
        None, description='"WIDTHxHEIGHT" (multiples of 8) or "auto"', examples=["512x512"]
    )
    response_format: str | None = Field(None, description='only "b64_json": generated files are not hosted')
    output_format: str | None = Field(None, description="png (default), jpeg or webp")
    stream: bool | None = None
    steps: int = Field(4, description="lcmkit extension: denoising steps")
    guidance_scale: float = Field(8.5, description="lcmkit extension")
    seed: int | None = Field(
        None, description="lcmkit extension: image i uses seed + i; none or -1 is random"
    )
    negative_prompt: str = Field("", description="lcmkit extension")
    # OpenAI fields honoured only in part (lcmkit.server.openai_api says which values)
    quality: Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"] | None = None
    style: Literal["vivid", "natural"] | None = None
    background: Literal["transparent", "opaque", "auto"] | None = None
    moderation: Literal["low", "auto"] | None = None
    output_compression: int | None = Field(
        None, ge=0, le=100, description="JPEG/WebP quality; PNG is lossless"
    )
    partial_images: int | None = Field(None, ge=0, le=3)
    complexity: Literal["low", "medium", "high"] | None = None
    frame_count: int | None = None
    frame_duration_ms: int | None = None
    svg: dict[str, Any] | None = None
    user: str | None = None
    safety_identifier: str | None = None


class A1111Request(RequestBody):
    """The fields txt2img and img2img share. `force_task_id` lets a client poll its own job's progress.

    After the fields lcmkit uses come the rest of A1111's, so that each is honoured, ignored where it does not change
    the image, or refused (or warned about) where it would: `lcmkit.server.a1111` says which.
    """

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 4
    cfg_scale: float = 8.5
    seed: int = -1
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1
    sampler_name: str | None = None
    force_task_id: str | None = None
    send_images: bool = Field(
        True, description="false: the reply carries no images (info and parameters only)"
    )
    infotext: str | None = Field(None, description="A1111 parameters text; fills the fields not given")
    override_settings: dict[str, Any] | None = Field(
        None, description="CLIP_stop_at_last_layers, samples_format, sd_model_checkpoint, sd_vae"
    )
    override_settings_restore_afterwards: bool | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    styles: list[str] | None = None
    subseed: int | None = None
    subseed_strength: float | None = None
    seed_resize_from_h: int | None = None
    seed_resize_from_w: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    s_min_uncond: float | None = None
    refiner_checkpoint: str | None = None
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] | None = Field(
        None,
        description='{"controlnet": {"args": [unit, ...]}} (sd-webui-controlnet units; see /controlnet/*)',
    )
    # no effect on the image here (see lcmkit.server.a1111)
    do_not_save_samples: bool | None = None
    do_not_save_grid: bool | None = None
    save_images: bool | None = None
    eta: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool | None = None
    comments: dict[str, Any] | None = None
    script_args: list[Any] | None = None


class Txt2ImgRequest(A1111Request):
    """`POST /sdapi/v1/txt2img`, AUTOMATIC1111 fields."""

    enable_hr: bool | None = None
    # read only by the hires fix
    denoising_strength: float | None = None
    firstphase_width: int | None = None
    firstphase_height: int | None = None
    hr_scale: float | None = None
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = None
    hr_resize_x: int | None = None
    hr_resize_y: int | None = None
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = None
    hr_negative_prompt: str | None = None
    firstpass_image: str | None = None


class Img2ImgRequest(A1111Request):
    """`POST /sdapi/v1/img2img`: the first of `init_images` (base64, optionally a `data:` URL) is resized to
    width x height when they are given (`resize_mode` 0, 1 or 2), else floored to a multiple of 8."""

    init_images: list[str]
    denoising_strength: float = 0.75
    mask: str | None = None
    include_init_images: bool = False
    resize_mode: int | None = None
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    # no effect on the image here (see lcmkit.server.a1111)
    image_cfg_scale: float | None = None
    mask_blur: int | None = None
    mask_blur_x: int | None = None
    mask_blur_y: int | None = None
    mask_round: bool | None = None
    inpainting_fill: int | None = None
    inpaint_full_res: bool | None = None
    inpaint_full_res_padding: int | None = None
    inpainting_mask_invert: int | None = None


@dataclass
class Translated:
    request: GenerationRequest
    iterations: int = 1
    job_id: str | None = None
    warnings: list[str] = field(default_factory=list)  # settings not honoured (the "warn" policy)
    output_format: str = "png"  # png, jpeg or webp
    output_compression: int | None = None  # JPEG/WebP quality
    send_images: bool = True


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise LimitError(
            f'size must look like "512x512" (WIDTHxHEIGHT) or "auto", got {size!r}', "size"
        ) from None
    return w, h


def check_openai_output(body: Any) -> None:
    """What an OpenAI reply can be here: base64 PNG/JPEG/WebP, all at once (generations and edits)."""
    if body.response_format not in (None, "b64_json"):
        raise LimitError(
            f"response_format {body.response_format!r} is not supported: only 'b64_json' is, "
            "since this server does not host generated files"
        )
    if body.stream:
        raise LimitError("stream=true is not supported; images are returned when they are done")
    if body.output_format is not None and body.output_format not in OUTPUT_FORMATS:
        raise LimitError(f"output_format must be one of {sorted(OUTPUT_FORMATS)}, got {body.output_format!r}")


def from_openai(body: OpenAIImageRequest, settings: Settings) -> Translated:
    check_text_lengths(body, settings)
    check_openai_output(body)
    width, height = parse_size(body.size)
    req = GenerationRequest(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        steps=body.steps,
        guidance_scale=body.guidance_scale,
        seed=request_seed(body.seed),
        width=width,
        height=height,
        num_images=1 if body.n is None else body.n,
    )
    check_limits(req, settings, batch_name="n")
    return Translated(req)


def from_a1111(body: A1111Request, settings: Settings, options: a1111.Options | None = None) -> Translated:
    check_text_lengths(body, settings)
    body = a1111.apply_infotext(body)
    honoured = a1111.review_request(body, settings, options)
    req = GenerationRequest(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        steps=body.steps,
        guidance_scale=body.cfg_scale,
        seed=request_seed(body.seed),
        width=body.width,
        height=body.height,
        num_images=body.batch_size,
        extra=honoured.pipeline_kwargs,
    )
    if isinstance(body, Img2ImgRequest):
        if body.mask:
            raise LimitError("inpainting (mask) is not supported; send init_images without a mask")
        if not body.init_images:
            raise LimitError(
                "img2img needs one image in init_images (base64 PNG/JPEG, optionally a data: URL)"
            )
        image = decode_image(body.init_images[0], settings, "init_images[0]", body.width, body.height)
        req.init_image = fit_image(image, body.width, body.height, settings, body.resize_mode or 0)
        req.width, req.height = req.init_image.size
        req.strength = body.denoising_strength
    review = Review(settings.unsupported)
    controls, size = controlnet.read_units(body, settings, review, req.width, req.height, req.init_image)
    if controls:
        req.controls = controls
        req.width, req.height = size
    warnings = honoured.warnings + review.finish()
    check_limits(req, settings, body.n_iter, batch_name="batch_size")
    return Translated(
        req,
        body.n_iter,
        body.force_task_id,
        warnings=warnings,
        output_format=honoured.samples_format,
        send_images=honoured.send_images,
    )


def request_seed(seed: int | None) -> int | None:
    """-1 (or any negative seed) is random, as in A1111."""
    return None if seed is None or seed < 0 else seed


def decode_image(
    data: str, settings: Settings, name: str, width: int | None = None, height: int | None = None
) -> PIL.Image.Image:
    """An RGB image from base64 text, with or without a `data:image/...;base64,` prefix. Its header and the size
    it will be resized to (`width`/`height`, see `images.fit_size`) are checked before it is decoded."""
    return images.load_image(images.b64_bytes(data, settings, name), settings, name, width, height)


def fit_image(
    image: PIL.Image.Image, width: int | None, height: int | None, settings: Settings, resize_mode: int = 0
) -> PIL.Image.Image:
    """A1111's resize modes (`a1111.resize`: 0 just resize, 1 crop and resize, 2 resize and fill) to the requested
    size; without one, floor the image's own size to 8."""
    w, h = images.fit_size(image.size, width, height, settings)
    return a1111.resize(image, resize_mode, w, h)


def encode_image(result: GeneratedImage, fmt: str = "png", quality: int | None = None) -> str:
    """Base64 image; PNGs carry the infotext in their `parameters` chunk, where A1111's PNG-info tab reads it.
    `quality` (0-100) is the JPEG/WebP quality (OpenAI's output_compression); PNG is lossless."""
    buf = io.BytesIO()
    if fmt == "png":
        info = PngInfo()
        info.add_text("parameters", result.infotext)
        result.image.save(buf, format="PNG", pnginfo=info)
    else:
        extra = {} if quality is None else {"quality": quality}
        result.image.save(buf, format=OUTPUT_FORMATS[fmt], **extra)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def openai_response(
    results: list[GeneratedImage], output_format: str | None, quality: int | None = None
) -> dict[str, Any]:
    return {
        "created": int(time.time()),
        "data": [{"b64_json": encode_image(r, output_format or "png", quality)} for r in results],
    }


def a1111_response(
    body: A1111Request, tr: Translated, results: list[GeneratedImage], model_name: str
) -> dict[str, Any]:
    """`images`, `parameters` (the request echoed) and `info` (a JSON string, as A1111 returns it); `warnings`
    lists the settings that were not honoured (the "warn" policy), and `info` claims none of them."""
    req = tr.request
    seeds = [r.seed for r in results]
    first = results[0].image if results else None
    parameters = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        parameters["init_images"] = None  # A1111 drops them unless asked, to keep replies small
    info = {
        "prompt": req.prompt,
        "all_prompts": [req.prompt] * len(results),
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [req.negative_prompt] * len(results),
        "seed": seeds[0] if seeds else -1,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(results),
        "subseed_strength": 0,
        "width": first.width if first else req.width,
        "height": first.height if first else req.height,
        "sampler_name": "LCM",
        "cfg_scale": req.guidance_scale,
        "steps": req.steps,
        "batch_size": req.num_images,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model_name,
        "sd_model_hash": None,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": req.strength if req.is_img2img else None,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": [r.infotext for r in results],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": req.extra.get("clip_skip", 0) + 1,  # A1111 counts the last layer as 1
        "is_using_inpainting_conditioning": False,
        "version": f"lcmkit {__version__}",
    }
    images = [encode_image(r, tr.output_format) for r in results] if tr.send_images else []
    out = {"images": images, "parameters": parameters, "info": json.dumps(info, allow_nan=False)}
    if tr.warnings:
        out["warnings"] = tr.warnings
    return out
