"""AUTOMATIC1111 compatibility: which of A1111's request fields lcmkit honours, its options, and its info routes.

A1111 clients send the whole `StableDiffusionProcessingTxt2Img/Img2Img` field set. Each field is one of:

- honoured: prompt, negative_prompt, steps, cfg_scale, seed, width, height, batch_size, n_iter (any product up to
  `max_images`; seeds consecutive), force_task_id, send_images (false: no images in the reply), infotext (its
  parameters fill the fields the request leaves unset, as in A1111), denoising_strength, init_images (one),
  resize_mode 0 (just resize), 1 (crop and resize) and 2 (resize and fill), include_init_images, and from
  `override_settings` (and `POST /sdapi/v1/options`, as server defaults): CLIP_stop_at_last_layers (N -> the
  pipelines' clip_skip N-1), samples_format (png, jpg/jpeg, webp), sd_model_checkpoint (the served model only)
  and sd_vae ("Automatic", "None" or the served VAE). `override_settings_restore_afterwards: false` keeps them.
- without effect on the image, so accepted and ignored: do_not_save_samples, do_not_save_grid, save_images (this
  server saves nothing), comments, subseed (without subseed_strength), script_args (without script_name),
  disable_extra_networks, refiner_switch_at (without a refiner), eta and s_churn/s_tmin/s_tmax/s_noise (the LCM
  sampler reads none of them, in A1111 either), the hr_* fields, firstphase_*, firstpass_image and txt2img's
  denoising_strength (all only read by the hires fix), image_cfg_scale (only instruct-pix2pix models), the mask
  options (mask_blur*, inpainting_fill, inpaint_full_res*, inpainting_mask_invert, mask_round: only with a mask).
- changing the image but not implemented: the `RULES` below (sampler other than LCM, a scheduler other than
  Automatic, styles, variation seeds, seed resize, face restoration, tiling, s_min_uncond, a refiner, scripts,
  always-on scripts other than ControlNet (`lcmkit.server.controlnet` reads its units), extra-network tags like `<lora:name:1>` in a prompt, the hires fix, several init images, resize
  mode 3, initial_noise_multiplier, and any other override_settings key). These follow the server's `unsupported`
  policy (`lcmkit.server.compat`): refused with 400 naming them, or run without them and listed in `warnings`.
- refused under either policy, because ignoring them would produce a different kind of result: a mask or latent
  mask (inpainting) and another checkpoint (`sd_model_checkpoint`).

Fields A1111 does not know are ignored, as A1111 does. The OpenAPI document shows the honoured values of each
refused field (`lcmkit.server.openapi` reads `RULES`), so a client can see what will be accepted.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from lcmkit.server import pnginfo
from lcmkit.server.compat import Review
from lcmkit.server.jobs import JobQueue, LimitError, Settings

logger = logging.getLogger(__name__)

SAMPLER_NAMES = ("LCM", "lcm")  # /sdapi/v1/samplers: the name and its alias
SCHEDULER_NAMES = ("automatic", "Automatic")  # /sdapi/v1/schedulers: A1111 accepts a name or a label
VAE_DEFAULTS = ("Automatic", "None")  # A1111's "pick the model's own VAE" choices
SAMPLES_FORMATS = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}  # A1111 name -> ours
CLIP_STOP_RANGE = (1, 12)  # A1111's CLIP_stop_at_last_layers slider
EXTRA_NETWORK_TAG = r"<\w+:[^>]+>"  # A1111 strips these from prompts and applies the networks they name
_TAG = re.compile(EXTRA_NETWORK_TAG)
NULL = {"type": "null"}


# ----------------------------------------------------------------------------------------------------------------------
# The fields that change the image and are not implemented


@dataclass(frozen=True)
class Rule:
    """An A1111 field whose honoured values are narrower than what A1111 accepts.

    `honoured(value)` says whether lcmkit does what A1111 would with it; `accepted` is the same set as JSON Schema,
    added (with allOf) to the field's schema in the OpenAPI document when the server refuses the rest.
    """

    name: str
    honoured: Callable[[Any], bool]
    accepted: dict[str, Any]
    feature: str

    def message(self, value: Any) -> str:
        if isinstance(value, dict):  # the keys only: values may hold images
            return f"{self.name} keys {json.dumps(sorted(value))[:200]} ({self.feature})"
        shown = json.dumps(value) if not isinstance(value, str) or len(value) < 60 else f'"{value[:57]}..."'
        return f"{self.name}={shown} ({self.feature})"


def _unset(value: Any) -> bool:
    return value is None or value in ("", "None")


def _off(value: Any) -> bool:
    return value is None or value is False


def _zero(value: Any) -> bool:
    return value is None or value == 0


def _empty(value: Any) -> bool:
    return not value


_UNSET = {"anyOf": [{"enum": ["", "None"]}, NULL]}
_OFF = {"enum": [False, None]}


def _zero_schema(kind: str = "number") -> dict[str, Any]:
    return {"anyOf": [{"type": kind, "minimum": 0, "maximum": 0}, NULL]}


COMMON_RULES = (
    Rule(
        "scheduler",
        lambda v: v is None or v in ("", *SCHEDULER_NAMES),
        {"anyOf": [{"enum": ["", *SCHEDULER_NAMES]}, NULL]},
        "a noise schedule other than the LCM sampler's own; see /sdapi/v1/schedulers",
    ),
    Rule("styles", _empty, {"anyOf": [{"type": "array", "maxItems": 0}, NULL]}, "saved prompt styles"),
    Rule("subseed_strength", _zero, _zero_schema(), "variation seeds"),
    Rule(
        "seed_resize_from_h",
        lambda v: v is None or v <= 0,
        {"anyOf": [{"type": "integer", "maximum": 0}, NULL]},
        "noise resized from another size",
    ),
    Rule(
        "seed_resize_from_w",
        lambda v: v is None or v <= 0,
        {"anyOf": [{"type": "integer", "maximum": 0}, NULL]},
        "noise resized from another size",
    ),
    Rule("restore_faces", _off, _OFF, "face restoration"),
    Rule("tiling", _off, _OFF, "seamless tiling"),
    Rule("s_min_uncond", _zero, _zero_schema(), "skipping the negative prompt at low noise"),
    Rule("refiner_checkpoint", _unset, _UNSET, "a refiner model"),
    Rule("script_name", _unset, _UNSET, "A1111 scripts"),
    Rule(
        "alwayson_scripts",
        lambda v: all(key.lower() == "controlnet" for key in v or {}),
        {},  # lcmkit.server.controlnet.alwayson_schema describes it
        "A1111 extensions (always-on scripts) other than ControlNet",
    ),
    Rule(
        "prompt",
        lambda v: not _TAG.search(v or ""),
        {"not": {"pattern": EXTRA_NETWORK_TAG}},
        "extra-network tags such as <lora:name:1>, which A1111 strips and applies; load LoRAs with "
        "`lcmkit serve --lora` instead",
    ),
    Rule(
        "negative_prompt",
        lambda v: not _TAG.search(v or ""),
        {"not": {"pattern": EXTRA_NETWORK_TAG}},
        "extra-network tags such as <lora:name:1>",
    ),
)
TXT2IMG_RULES = (*COMMON_RULES, Rule("enable_hr", _off, _OFF, "the hires fix, a second upscaled pass"))
IMG2IMG_RULES = (
    *COMMON_RULES,
    Rule(
        "init_images",
        lambda v: v is None or len(v) <= 1,
        {"maxItems": 1},
        "several init images: A1111 gives each image of the batch its own, lcmkit uses the first",
    ),
    Rule(
        "resize_mode",
        lambda v: v is None or v in (0, 1, 2),
        {"anyOf": [{"enum": [0, 1, 2]}, NULL]},
        "resize mode 3, latent upscale; 0 just resize, 1 crop and resize, 2 resize and fill are supported",
    ),
    Rule(
        "initial_noise_multiplier",
        lambda v: v is None or v == 1,
        {"anyOf": [{"type": "number", "minimum": 1, "maximum": 1}, NULL]},
        "scaling the img2img noise",
    ),
)


def rules_for(img2img: bool) -> tuple[Rule, ...]:
    return IMG2IMG_RULES if img2img else TXT2IMG_RULES


# ----------------------------------------------------------------------------------------------------------------------
# What is served, and the options kept between requests


def served_checkpoints(settings: Settings) -> list[dict[str, Any]]:
    """`/sdapi/v1/sd-models`: the one model this server runs."""
    name = settings.model_name
    return [
        {"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}
    ]


def checkpoint_names(settings: Settings) -> list[str]:
    """The values of `sd_model_checkpoint` that mean the served model (its title, name and file name)."""
    names: list[str] = []
    for entry in served_checkpoints(settings):
        for key in ("title", "model_name", "filename"):
            if entry[key] not in names:
                names.append(entry[key])
    return names


def served_vaes(settings: Settings) -> list[dict[str, str]]:
    """`/sdapi/v1/sd-vae`: the VAE served instead of the model's own (`--tiny-vae`), if any. A1111 lists the VAE
    files one could switch to; this server cannot switch, so it lists only what it decodes with."""
    if not settings.vae_name:
        return []
    return [{"model_name": Path(settings.vae_name.rstrip("/")).name, "filename": settings.vae_name}]


def vae_names(settings: Settings) -> list[str]:
    return [*VAE_DEFAULTS, *(n for v in served_vaes(settings) for n in (v["model_name"], v["filename"]))]


def option_schemas(settings: Settings) -> dict[str, dict[str, Any]]:
    """JSON Schema of each supported option (`override_settings` keys and `POST /sdapi/v1/options` keys)."""
    low, high = CLIP_STOP_RANGE
    return {
        "sd_model_checkpoint": {"type": "string", "enum": checkpoint_names(settings)},
        "CLIP_stop_at_last_layers": {"type": "integer", "minimum": low, "maximum": high},
        "samples_format": {"type": "string", "enum": list(SAMPLES_FORMATS)},
        "sd_vae": {"type": "string", "enum": vae_names(settings)},
    }


def check_options(
    values: Mapping[str, Any], settings: Settings, review: Review, where: str
) -> dict[str, Any]:
    """The supported options in `values`, checked (a bad value raises `LimitError`); other keys go to `review`."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{where}.{key}" if where else key
        if key == "sd_model_checkpoint":
            served = checkpoint_names(settings)
            if value not in served:
                raise LimitError(
                    f"{name}={value!r}: this server runs one model and cannot switch checkpoints; "
                    f"it serves {served}",
                    name,
                )
        elif key == "CLIP_stop_at_last_layers":
            low, high = CLIP_STOP_RANGE
            if (
                isinstance(value, float) and value.is_integer()
            ):  # JSON has one number type: 2.0 is the integer 2
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise LimitError(f"{name} must be an integer from {low} to {high}, got {value!r}", name)
            out[key] = value
        elif key == "samples_format":
            if not isinstance(value, str) or value not in SAMPLES_FORMATS:
                raise LimitError(f"{name} must be one of {list(SAMPLES_FORMATS)}, got {value!r}", name)
            out[key] = value
        elif key == "sd_vae":
            if not isinstance(value, str):
                raise LimitError(f"{name} must be a VAE name, got {value!r}", name)
            if value not in vae_names(settings):
                review.add(
                    name, f"{name}={value!r} (another VAE; this server decodes with {vae_names(settings)})"
                )
        else:
            review.add(name, f"{name} (an A1111 setting lcmkit does not implement)")
    return out


class Options:
    """The A1111 options this server keeps: `GET/POST /sdapi/v1/options`, defaults for every later request."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {"CLIP_stop_at_last_layers": 1, "samples_format": "png"}

    def get(self, key: str) -> Any:
        with self._lock:
            return self._values[key]

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            values = dict(self._values)
        vae = served_vaes(self.settings)
        return {
            "sd_model_checkpoint": served_checkpoints(self.settings)[0]["title"],
            "sd_vae": vae[0]["model_name"] if vae else "Automatic",
            **values,
        }

    def set(self, values: Mapping[str, Any]) -> None:
        with self._lock:
            self._values.update(values)

    def update(self, body: Mapping[str, Any]) -> list[str]:
        """`POST /sdapi/v1/options`: check every key first, then apply the supported ones; returns warnings."""
        review = Review(self.settings.unsupported)
        values = check_options(body, self.settings, review, "")
        warnings = review.finish()
        self.set(values)
        return warnings


# ----------------------------------------------------------------------------------------------------------------------
# Reviewing one txt2img/img2img request


@dataclass
class Honoured:
    """What an A1111 request asks beyond `GenerationRequest`'s fields, as lcmkit will do it."""

    warnings: list[str] = field(default_factory=list)
    clip_stop: int = 1  # A1111's CLIP_stop_at_last_layers
    samples_format: str = "png"  # ours: png, jpeg or webp
    send_images: bool = True

    @property
    def pipeline_kwargs(self) -> dict[str, Any]:
        """The pipeline's `clip_skip` is A1111's N - 1 (N=1: the last layer, the default)."""
        return {"clip_skip": self.clip_stop - 1} if self.clip_stop > 1 else {}


def review_request(body: Any, settings: Settings, options: Options | None) -> Honoured:
    """Check an A1111 request's fields (see the module doc): refuse or collect what lcmkit does not honour."""
    img2img = hasattr(body, "init_images")
    review = Review(settings.unsupported)
    if img2img and (body.mask or getattr(body, "latent_mask", None)):
        raise LimitError("inpainting (mask) is not supported; send init_images without a mask", "mask")
    sampler_field = "sampler_name" if body.sampler_name else "sampler_index"
    sampler = body.sampler_name or getattr(body, "sampler_index", None)
    if sampler and sampler not in SAMPLER_NAMES:
        review.add(
            sampler_field,
            f"{sampler_field}={sampler!r} (another sampler: lcmkit samples with LCM only, see /sdapi/v1/samplers)",
        )
    for rule in rules_for(img2img):
        value = getattr(body, rule.name, None)
        if not rule.honoured(value):
            review.add(rule.name, rule.message(value))
    overrides = check_options(body.override_settings or {}, settings, review, "override_settings")
    warnings = review.finish()
    if overrides and body.override_settings_restore_afterwards is False and options is not None:
        options.set(overrides)  # A1111 keeps such overrides as its options
    clip_stop = overrides.get(
        "CLIP_stop_at_last_layers", options.get("CLIP_stop_at_last_layers") if options else 1
    )
    fmt = overrides.get("samples_format", options.get("samples_format") if options else "png")
    send = body.send_images is not False
    return Honoured(warnings, clip_stop, SAMPLES_FORMATS[fmt], send)


# ----------------------------------------------------------------------------------------------------------------------
# img2img resize modes


def resize(image: PIL.Image.Image, mode: int, width: int, height: int) -> PIL.Image.Image:
    """`image` at width x height by A1111's img2img `resize_mode`:

    0 just resize (stretch); 1 crop and resize (scale to cover, centre crop); 2 resize and fill (scale to fit,
    centre, then fill the two bands by stretching the image's own edge rows or columns outwards).
    """
    lanczos = PIL.Image.Resampling.LANCZOS
    if image.size == (width, height):
        return image
    if mode == 0:
        return image.resize((width, height), lanczos)
    if mode not in (1, 2):
        raise LimitError(f"resize_mode must be 0, 1 or 2 here, got {mode}", "resize_mode")
    cover = mode == 1
    scale = (max if cover else min)(width / image.width, height / image.height)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    scaled = image.resize((w, h), lanczos)
    if cover:
        left, top = (w - width) // 2, (h - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    canvas = PIL.Image.new(image.mode, (width, height))
    left, top = (width - w) // 2, (height - h) // 2
    canvas.paste(scaled, (left, top))
    if h < height:  # bands above and below: the first and last rows, stretched
        if top:
            canvas.paste(scaled.crop((0, 0, w, 1)).resize((w, top)), (left, 0))
        if height - top - h:
            canvas.paste(scaled.crop((0, h - 1, w, h)).resize((w, height - top - h)), (left, top + h))
    if w < width:  # bands left and right: the first and last columns, stretched
        if left:
            canvas.paste(scaled.crop((0, 0, 1, h)).resize((left, h)), (0, top))
        if width - left - w:
            canvas.paste(scaled.crop((w - 1, 0, w, h)).resize((width - left - w, h)), (left + w, top))
    return canvas


# ----------------------------------------------------------------------------------------------------------------------
# Infotext as request parameters (A1111's `infotext` field)


def _number(kind: type) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        return kind(float(text)) if kind is int and re.fullmatch(r"-?\d+(\.0+)?", text) else kind(text)

    return convert


def _flag(text: str) -> bool:
    return text.strip().lower() not in ("false", "0", "")


# infotext key -> (request field, converter). Keys naming features lcmkit lacks map to their fields, so that the
# usual review refuses or warns about them.
INFOTEXT_FIELDS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "Prompt": ("prompt", str),
    "Negative prompt": ("negative_prompt", str),
    "Steps": ("steps", _number(int)),
    "Sampler": ("sampler_name", str),
    "Schedule type": ("scheduler", str),
    "CFG scale": ("cfg_scale", _number(float)),
    "Seed": ("seed", _number(int)),
    "Size-1": ("width", _number(int)),
    "Size-2": ("height", _number(int)),
    "Variation seed": ("subseed", _number(int)),
    "Variation seed strength": ("subseed_strength", _number(float)),
    "Seed resize from-1": ("seed_resize_from_w", _number(int)),
    "Seed resize from-2": ("seed_resize_from_h", _number(int)),
    "Face restoration": ("restore_faces", _flag),
    "Tiling": ("tiling", _flag),
    "Hires upscale": ("enable_hr", _flag),
    "Hires resize-1": ("enable_hr", _flag),
    "Denoising strength": ("denoising_strength", _number(float)),
}


def apply_infotext(body: Any) -> Any:
    """A copy of `body` with the parameters of its `infotext` filling the fields the request did not set (A1111's
    `apply_infotext`); `Clip skip` goes to override_settings.CLIP_stop_at_last_layers unless that is set."""
    text = getattr(body, "infotext", None)
    if not text:
        return body
    params = pnginfo.parse_infotext(text)
    img2img = hasattr(body, "init_images")
    changes: dict[str, Any] = {}
    for key, value in params.items():
        target = INFOTEXT_FIELDS.get(key)
        if target is None or target[0] in body.model_fields_set or target[0] in changes:
            continue
        name, convert = target
        if name == "denoising_strength" and not img2img:
            continue  # in a txt2img infotext it is the hires fix's strength
        if key in ("Prompt", "Negative prompt") and not value:
            continue
        try:
            changes[name] = convert(value)
        except ValueError:
            raise LimitError(f"infotext: {key}: {value!r} is not a valid value", "infotext") from None
    overrides = dict(body.override_settings or {})
    if "Clip skip" in params and "CLIP_stop_at_last_layers" not in overrides:
        try:
            overrides["CLIP_stop_at_last_layers"] = int(params["Clip skip"])
        except ValueError:
            raise LimitError(
                f"infotext: Clip skip: {params['Clip skip']!r} is not an integer", "infotext"
            ) from None
        changes["override_settings"] = overrides
    if not changes:
        return body
    try:
        return body.model_validate({**body.model_dump(), **changes})
    except ValueError as e:
        raise LimitError(f"infotext: {e}", "infotext") from None


# ----------------------------------------------------------------------------------------------------------------------
# Loaded LoRAs


def _safetensors_metadata(path: Path) -> dict[str, Any]:
    """A safetensors file's `__metadata__`, values that hold JSON objects or lists decoded (as A1111 shows them)."""
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # listed without metadata rather than failing the listing
        logger.warning("cannot read the metadata of %s: %s", path, e)
        return {}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, str) and value[:1] in "{[":
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key] = value
    return out


def loaded_loras(pipe: Any) -> list[dict[str, Any]]:
    """`/sdapi/v1/loras`: the LoRAs loaded into the served pipeline, in A1111's shape. `name` is the file's stem
    (the adapter name when it came from a state dict), `alias` the adapter name inside lcmkit."""
    files = getattr(pipe, "lora_files", None)
    if files is None:
        return []
    out = []
    for adapter, path in files.items():
        metadata = _safetensors_metadata(path) if path is not None else {}
        out.append(
            {
                "name": path.stem if path is not None else adapter,
                "alias": adapter,
                "path": str(path) if path is not None else None,
                "metadata": metadata,
            }
        )
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Routes


class PNGInfoRequest(BaseModel):
    image: str = Field(description="a base64 image (PNG with a `parameters` chunk, or JPEG/WebP with EXIF)")


class PNGInfoResponse(BaseModel):
    info: str = Field(description="the infotext, as written")
    items: dict[str, str] = Field(description="the image's other text chunks")
    parameters: dict[str, str] = Field(
        description="the infotext parsed: Prompt, Negative prompt, Steps, Size-1..."
    )


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None
    default_rho: float | None
    need_inner_model: bool | None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None


class SDVaeItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    filename: str


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str | None
    metadata: dict[str, Any]


class WarningsReply(BaseModel):
    warnings: list[str]


SAMPLERS = [{"name": "LCM", "aliases": ["lcm"], "options": {}}]
SCHEDULERS = [
    {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False}
]


def router(jobs: JobQueue, settings: Settings, options: Options) -> APIRouter:
    """The A1111 routes that describe the server: models, samplers, schedulers, VAEs, LoRAs, options, png-info."""
    api = APIRouter(tags=["a1111"])

    @api.get("/sdapi/v1/sd-models", response_model=list[SDModelItem])
    def sd_models() -> list[dict[str, Any]]:
        """The served model; `sd_model_checkpoint` accepts its title, model_name or filename."""
        return served_checkpoints(settings)

    @api.get("/sdapi/v1/samplers", response_model=list[SamplerItem])
    def samplers() -> list[dict[str, Any]]:
        return SAMPLERS

    @api.get("/sdapi/v1/schedulers", response_model=list[SchedulerItem])
    def schedulers() -> list[dict[str, Any]]:
        """One: "Automatic", the LCM sampler's own schedule."""
        return SCHEDULERS

    @api.get("/sdapi/v1/sd-vae", response_model=list[SDVaeItem])
    def sd_vae() -> list[dict[str, str]]:
        """The VAE decoding instead of the model's own (a tiny VAE), or none."""
        return served_vaes(settings)

    @api.get("/sdapi/v1/loras", response_model=list[LoraItem])
    def loras() -> list[dict[str, Any]]:
        """The LoRAs loaded into the served pipeline (`lcmkit serve --lora`); empty when there are none."""
        if jobs.pipe is None:
            if jobs.load_error is not None:
                raise HTTPException(503, f"the model failed to load: {jobs.load_error}")
            raise HTTPException(
                503, "the model is still loading", {"Retry-After": str(settings.retry_after_s)}
            )
        return loaded_loras(jobs.pipe)

    @api.get("/sdapi/v1/options")
    def get_options() -> dict[str, Any]:
        """The options this server keeps; POST changes the supported ones."""
        return options.as_dict()

    @api.post("/sdapi/v1/options", response_model=WarningsReply | None)
    def set_options(body: dict[str, Any]) -> dict[str, Any] | None:
        """CLIP_stop_at_last_layers and samples_format become defaults for later requests; sd_model_checkpoint and
        sd_vae may only name what is served. Other keys are refused, or ignored with `warnings` (--unsupported)."""
        try:
            warnings = options.update(body)
        except LimitError as e:
            raise HTTPException(400, str(e)) from None
        return {"warnings": warnings} if warnings else None

    @api.post("/sdapi/v1/png-info", response_model=PNGInfoResponse)
    def png_info_route(body: PNGInfoRequest) -> dict[str, Any]:
        """The parameters text of an image made by lcmkit or A1111, and its parsed fields."""
        try:
            return pnginfo.png_info(body.image, settings)
        except LimitError as e:
            raise HTTPException(400, str(e)) from None

    return api
