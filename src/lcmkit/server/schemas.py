"""Request bodies of the two HTTP dialects we speak, and their translation to one `GenerationRequest`.

OpenAI images API (`/v1/images/generations`) and AUTOMATIC1111's web UI API (`/sdapi/v1/txt2img`, `img2img`).
Unknown fields are ignored, as both servers do, so existing clients that send sampler names, styles or `quality`
keep working. Defaults differ from A1111 where LCM needs it: 4 steps (not 50) and CFG 8.5 (not 7); the size
defaults to the model's native size (not 512).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
from dataclasses import dataclass
from typing import Any

import PIL.Image
from PIL.PngImagePlugin import PngInfo
from pydantic import BaseModel, ConfigDict, Field

from lcmkit import __version__
from lcmkit.request import GeneratedImage, GenerationRequest
from lcmkit.server.jobs import LimitError, Settings, check_limits, check_size

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


class OpenAIImageRequest(BaseModel):
    """`POST /v1/images/generations`. `model` is ignored (one model is loaded); the last four fields are ours."""

    model_config = ConfigDict(extra="ignore")

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


class Txt2ImgRequest(BaseModel):
    """`POST /sdapi/v1/txt2img`, AUTOMATIC1111 fields. `force_task_id` lets a client poll its own job's progress."""

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


class Img2ImgRequest(Txt2ImgRequest):
    """`POST /sdapi/v1/img2img`: the first of `init_images` (base64, optionally a `data:` URL) is resized to
    width x height when they are given, else floored to a multiple of 8."""

    init_images: list[str]
    denoising_strength: float = 0.75
    mask: str | None = None
    include_init_images: bool = False


@dataclass
class Translated:
    request: GenerationRequest
    iterations: int = 1
    job_id: str | None = None


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise LimitError(f'size must look like "512x512" (WIDTHxHEIGHT) or "auto", got {size!r}') from None
    return w, h


def from_openai(body: OpenAIImageRequest, settings: Settings) -> Translated:
    if body.response_format not in (None, "b64_json"):
        raise LimitError(
            f"response_format {body.response_format!r} is not supported: only 'b64_json' is, "
            "since this server does not host generated files"
        )
    if body.stream:
        raise LimitError("stream=true is not supported; images are returned when they are done")
    if (body.output_format or "png") not in OUTPUT_FORMATS:
        raise LimitError(f"output_format must be one of {sorted(OUTPUT_FORMATS)}, got {body.output_format!r}")
    width, height = parse_size(body.size)
    req = GenerationRequest(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        steps=body.steps,
        guidance_scale=body.guidance_scale,
        seed=_seed(body.seed),
        width=width,
        height=height,
        num_images=1 if body.n is None else body.n,
    )
    check_limits(req, settings, batch_name="n")
    return Translated(req)


def from_a1111(body: Txt2ImgRequest, settings: Settings) -> Translated:
    req = GenerationRequest(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        steps=body.steps,
        guidance_scale=body.cfg_scale,
        seed=_seed(body.seed),
        width=body.width,
        height=body.height,
        num_images=body.batch_size,
    )
    if isinstance(body, Img2ImgRequest):
        if body.mask:
            raise LimitError("inpainting (mask) is not supported; send init_images without a mask")
        if not body.init_images:
            raise LimitError(
                "img2img needs one image in init_images (base64 PNG/JPEG, optionally a data: URL)"
            )
        image = decode_image(body.init_images[0], settings, "init_images[0]")
        req.init_image = _fit(image, body.width, body.height, settings)
        req.width, req.height = req.init_image.size
        req.strength = body.denoising_strength
    check_limits(req, settings, body.n_iter, batch_name="batch_size")
    return Translated(req, body.n_iter, body.force_task_id)


def _seed(seed: int | None) -> int | None:
    return None if seed is None or seed < 0 else seed


def decode_image(data: str, settings: Settings, name: str) -> PIL.Image.Image:
    """An RGB image from base64 text, with or without a `data:image/...;base64,` prefix."""
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if not header.endswith(";base64"):
            raise LimitError(f"{name} is a data: URL that is not base64 encoded")
    data = "".join(data.split())
    if len(data) * 3 // 4 > settings.max_upload_bytes:
        raise LimitError(f"{name} is larger than the upload limit of {settings.max_upload_bytes} bytes")
    try:
        raw = base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise LimitError(f"{name} is not valid base64: {e}") from None
    try:
        with PIL.Image.open(io.BytesIO(raw)) as im:
            return im.convert("RGB")
    except (OSError, PIL.Image.DecompressionBombError, ValueError) as e:
        raise LimitError(f"{name} is base64 but not an image PIL can read: {e}") from None


def _fit(
    image: PIL.Image.Image, width: int | None, height: int | None, settings: Settings
) -> PIL.Image.Image:
    """A1111 resize mode 0 ("just resize") to the requested size; without one, floor the image's own size to 8."""
    if width is None and height is None:
        w, h = image.width // 8 * 8, image.height // 8 * 8
        for name, value, maximum in (("width", w, settings.max_width), ("height", h, settings.max_height)):
            try:
                check_size(name, value, settings, maximum)
            except LimitError as e:
                raise LimitError(
                    f"the init image is {image.width}x{image.height}: {e}; pass width and height to resize it"
                ) from None
    else:
        w, h = width or image.width * height // image.height, height or image.height * width // image.width
        w, h = max(8, w // 8 * 8), max(8, h // 8 * 8)
    return image if image.size == (w, h) else image.resize((w, h), PIL.Image.Resampling.LANCZOS)


def encode_image(result: GeneratedImage, fmt: str = "png") -> str:
    """Base64 image; PNGs carry the infotext in their `parameters` chunk, where A1111's PNG-info tab reads it."""
    buf = io.BytesIO()
    if fmt == "png":
        info = PngInfo()
        info.add_text("parameters", result.infotext)
        result.image.save(buf, format="PNG", pnginfo=info)
    else:
        result.image.save(buf, format=OUTPUT_FORMATS[fmt])
    return base64.b64encode(buf.getvalue()).decode("ascii")


def openai_response(results: list[GeneratedImage], output_format: str | None) -> dict[str, Any]:
    return {
        "created": int(time.time()),
        "data": [{"b64_json": encode_image(r, output_format or "png")} for r in results],
    }


def a1111_response(
    body: Txt2ImgRequest, tr: Translated, results: list[GeneratedImage], model_name: str
) -> dict[str, Any]:
    """`images`, `parameters` (the request echoed) and `info` (a JSON string, as A1111 returns it)."""
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
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": f"lcmkit {__version__}",
    }
    return {"images": [encode_image(r) for r in results], "parameters": parameters, "info": json.dumps(info)}
