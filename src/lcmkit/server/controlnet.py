"""ControlNet on the A1111 routes, as the sd-webui-controlnet extension's API takes it.

A request carries `alwayson_scripts: {"controlnet": {"args": [unit, ...]}}`; each unit names a ControlNet the server
loaded (`lcmkit serve --controlnet KIND=PATH_OR_ID`), an image, a preprocessor and a weight. The extension's
routes that clients call first (`/controlnet/version`, `/model_list`, `/module_list`, `/detect`) answer with what
this server loaded and can run.

Unit fields:

- honoured: enabled (default true, as the extension's API had it before 1.1.4xx; false units are skipped without
  being read), image or input_image (base64, `data:` URLs too; or `{"image": ..., "mask": null}`; checked like
  init_images before decoding; img2img falls back to the init image, as the extension does), module ("none" or
  "canny"), model (a loaded net: its kind, its folder/file name or its source, with or without A1111's " [hash]"),
  weight (0..2), guidance_start/guidance_end (fractions of the steps, start < end), threshold_a/threshold_b
  (canny's low/high; outside 1..255 the defaults 100/200, as the extension resets them), resize_mode ("Just
  Resize"/0, "Crop and Resize"/1 (the extension's default), "Resize and Fill"/2 and the extension's aliases),
  control_mode "Balanced"/0.
- accepted and ignored: processor_res and pixel_perfect (canny runs on the image already resized to the output
  size, which is what pixel perfect asks for), low_vram, guess_mode false, save_detected_map, hr_option (only
  with the hires fix), inpaint_crop_input_image, is_ui, output_dir, pulid_mode, and fields the extension does not
  know.
- changing the image but not implemented (refused with 400, or warned about under `--unsupported warn`):
  control_mode other than Balanced, guess_mode true, a mask, effective_region_mask, advanced_weighting,
  ipadapter_input, loopback, batch input modes.
- refused either way: a module lcmkit cannot run (another preprocessor, IP-Adapter), a model not loaded, more
  enabled units than loaded nets, one net used twice.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any, Literal

import PIL.Image
from fastapi import APIRouter, HTTPException
from pydantic import ConfigDict, Field, ValidationError

from lcmkit.control import ControlUnit, canny
from lcmkit.server import a1111, images
from lcmkit.server.compat import Review
from lcmkit.server.guards import RequestBody
from lcmkit.server.jobs import LimitError, Settings

SCRIPT = "controlnet"
MAX_UNITS = 16  # units a request may list, enabled or not
API_VERSION = 2  # what /controlnet/version answers (the extension's API version)
MODULES = ("none", "canny")  # preprocessors this server runs (A1111 names)
_NONE_MODULES = (None, "", "none", "None")
CANNY_DEFAULTS = (100.0, 200.0)
THRESHOLD_RANGE = (1.0, 255.0)  # the extension's canny sliders; values outside fall back to the defaults
RESIZE_MODES = {
    0: 0,
    1: 1,
    2: 2,
    "Just Resize": 0,
    "Crop and Resize": 1,
    "Resize and Fill": 2,
    "Inner Fit (Scale to Fit)": 1,
    "Scale to Fit (Inner Fit)": 1,
    "Outer Fit (Shrink to Fit)": 2,
    "Envelope (Outer Fit)": 2,
}
RESIZE_NAMES = ("Just Resize", "Crop and Resize", "Resize and Fill")
CONTROL_MODES = (0, 1, 2, "Balanced", "My prompt is more important", "ControlNet is more important")
_HASH = re.compile(r"\s*\[[^\]]*\]\s*$")  # A1111's " [d14c016b]" after a model name


class ControlNetUnit(RequestBody):
    """One unit of `alwayson_scripts.controlnet.args` (the sd-webui-controlnet extension's API)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    enabled: bool = True
    image: str | dict[str, Any] | None = Field(None, description="base64 image (or {image, mask})")
    input_image: str | None = Field(None, description="the extension's older name of `image`")
    module: str | None = Field("none", description='preprocessor: "none" or "canny"')
    model: str | None = Field(None, description="a loaded ControlNet: see /controlnet/model_list")
    weight: float = Field(1.0, ge=0.0, le=2.0)
    guidance_start: float = Field(0.0, ge=0.0, le=1.0)
    guidance_end: float = Field(1.0, ge=0.0, le=1.0)
    threshold_a: float = -1.0
    threshold_b: float = -1.0
    resize_mode: int | str = "Crop and Resize"
    control_mode: int | str = "Balanced"
    processor_res: int = -1
    pixel_perfect: bool = False
    low_vram: bool = False
    lowvram: bool | None = None
    guess_mode: bool | None = None
    mask: Any = None
    mask_image: Any = None
    effective_region_mask: Any = None
    advanced_weighting: list[float] | None = None
    ipadapter_input: Any = None
    loopback: bool | None = None
    input_mode: str | None = None
    batch_images: Any = None


# ----------------------------------------------------------------------------------------------------------------------
# What is loaded


def net_name(source: str) -> str:
    """A loaded net's name as /controlnet/model_list shows it: a file's stem, a folder's or hub id's last part."""
    return Path(source.rstrip("/\\")).stem if Path(source).suffix else Path(source.rstrip("/\\")).name


def model_list(settings: Settings) -> list[str]:
    return [net_name(source) for _, source in settings.controlnets]


def find_net(model: str | None, settings: Settings) -> int | None:
    """The index of the loaded net `model` names (kind, name or source, with or without " [hash]")."""
    if not model:
        return None
    name = _HASH.sub("", model)
    for i, (kind, source) in enumerate(settings.controlnets):
        if name in (net_name(source), source, kind):
            return i
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Reading a request's units


def script_args(scripts: dict[str, Any] | None) -> tuple[str, Any] | None:
    """(key, value) of the ControlNet entry of `alwayson_scripts` (its key in any case), or None."""
    for key, value in (scripts or {}).items():
        if key.lower() == SCRIPT:
            return key, value
    return None


def _unit_bodies(scripts: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """(field name, unit) of every unit listed, checked for shape only."""
    found = script_args(scripts)
    if found is None:
        return []
    key, value = found
    where = f"alwayson_scripts.{key}"
    if not isinstance(value, dict) or not isinstance(value.get("args"), list):
        raise LimitError(f'{where} must be an object {{"args": [unit, ...]}}', where)
    args = value["args"]
    if len(args) > MAX_UNITS:
        raise LimitError(f"{where}.args lists {len(args)} units; at most {MAX_UNITS}", f"{where}.args")
    out = []
    for i, unit in enumerate(args):
        if not isinstance(unit, dict):
            raise LimitError(f"{where}.args[{i}] must be an object (a ControlNet unit)", f"{where}.args[{i}]")
        out.append((f"{where}.args[{i}]", unit))
    return out


def _parse(raw: dict[str, Any], name: str, settings: Settings) -> ControlNetUnit:
    try:
        unit = ControlNetUnit.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join([name, *(str(p) for p in err.get("loc", ()))])
        raise LimitError(f"{where}: {err.get('msg')}", where) from None
    for field in ("module", "model", "resize_mode", "control_mode", "input_mode"):
        value = getattr(unit, field)
        if isinstance(value, str) and len(value) > settings.max_text_chars:
            raise LimitError(f"{name}.{field} is longer than {settings.max_text_chars} characters", name)
    return unit


def _review_unit(unit: ControlNetUnit, name: str, review: Review) -> None:
    """What would change the image and is not implemented: refused or warned about (the server's policy)."""
    if unit.control_mode not in CONTROL_MODES:
        raise LimitError(
            f"{name}.control_mode must be one of {list(CONTROL_MODES)}, got {unit.control_mode!r}",
            f"{name}.control_mode",
        )
    if unit.control_mode not in (0, "Balanced"):
        review.add(
            f"{name}.control_mode",
            f"{name}.control_mode={unit.control_mode!r} (only Balanced is implemented)",
        )
    unsupported = {
        "guess_mode": unit.guess_mode is True,
        "mask": unit.mask is not None or unit.mask_image is not None,
        "effective_region_mask": unit.effective_region_mask is not None,
        "advanced_weighting": unit.advanced_weighting is not None,
        "ipadapter_input": unit.ipadapter_input is not None,
        "loopback": unit.loopback is True,
        "input_mode": unit.input_mode not in (None, "simple", "Single Image")
        or unit.batch_images not in (None, "", []),
    }
    for field, on in unsupported.items():
        if on:
            review.add(f"{name}.{field}", f"{name}.{field} (a ControlNet feature lcmkit does not implement)")


def _module(unit: ControlNetUnit, name: str) -> str:
    module = unit.module
    if isinstance(module, str) and len(module) > 80:
        module = module[:77] + "..."
    if module in _NONE_MODULES:
        return "none"
    if module == "canny":
        return "canny"
    if module.startswith("ip-adapter"):
        raise LimitError(
            f"{name}.module={module!r}: IP-Adapter units are not served; lcmkit serve loads ControlNets only",
            f"{name}.module",
        )
    raise LimitError(
        f"{name}.module={module!r} is not a preprocessor this server runs; use one of {list(MODULES)} "
        '(for a depth map, pose skeleton, ... send the finished control image with module "none")',
        f"{name}.module",
    )


def _image_text(unit: ControlNetUnit, name: str) -> tuple[str | None, str]:
    """The base64 text of a unit's image (None: none given) and the field it came from."""
    if unit.image is not None and unit.input_image is not None:
        raise LimitError(f"{name}: give image or input_image, not both", f"{name}.image")
    if unit.input_image is not None:
        return unit.input_image, f"{name}.input_image"
    image = unit.image
    if isinstance(image, dict):
        if image.get("mask") is not None:
            raise LimitError(f"{name}.image.mask: masks are not supported", f"{name}.image.mask")
        if not isinstance(image.get("image"), str):
            raise LimitError(f'{name}.image must be base64 text or {{"image": base64}}', f"{name}.image")
        return image["image"], f"{name}.image.image"
    return image, f"{name}.image"


def _thresholds(unit: ControlNetUnit) -> tuple[float, float]:
    low, high = THRESHOLD_RANGE
    a = unit.threshold_a if low <= unit.threshold_a <= high else CANNY_DEFAULTS[0]
    b = unit.threshold_b if low <= unit.threshold_b <= high else CANNY_DEFAULTS[1]
    return a, b


def read_units(
    body: Any,
    settings: Settings,
    review: Review,
    width: int | None,
    height: int | None,
    init_image: PIL.Image.Image | None = None,
) -> tuple[tuple[ControlUnit | None, ...], tuple[int, int] | None]:
    """The request's enabled units as `ControlUnit`s, one entry per loaded net (None: not used), and the output
    size (None: no unit). Each image is checked from its header before it is decoded, then resized to the output
    size by its resize mode: the request's size, else the first unit image's (floored to 8; as diffusers)."""
    units: list[ControlUnit | None] = [None] * len(settings.controlnets)
    size = (width, height) if width and height else None
    for name, raw in _unit_bodies(getattr(body, "alwayson_scripts", None)):
        if raw.get("enabled", True) is False:
            continue
        unit = _parse(raw, name, settings)
        if not settings.controlnets:
            raise LimitError(
                f"{name}: this server has no ControlNet loaded (start it with --controlnet KIND=PATH_OR_ID)",
                name,
            )
        _review_unit(unit, name, review)
        module = _module(unit, name)
        index = find_net(unit.model, settings)
        if index is None:
            raise LimitError(
                f"{name}.model={unit.model!r} is not loaded; loaded: {model_list(settings)} (or their kinds "
                f"{[k for k, _ in settings.controlnets]})",
                f"{name}.model",
            )
        if units[index] is not None:
            raise LimitError(
                f"{name}.model: ControlNet {model_list(settings)[index]} is used by two units", name
            )
        if unit.resize_mode not in RESIZE_MODES:
            raise LimitError(
                f"{name}.resize_mode must be one of {list(RESIZE_NAMES)} or 0, 1, 2, got {unit.resize_mode!r}",
                f"{name}.resize_mode",
            )
        if not unit.guidance_start < unit.guidance_end:
            raise LimitError(
                f"{name}: guidance_start={unit.guidance_start:g} must be below guidance_end={unit.guidance_end:g}",
                f"{name}.guidance_start",
            )
        low, high = _thresholds(unit)
        if module == "canny" and low > high:
            raise LimitError(
                f"{name}: threshold_a={low:g} must not exceed threshold_b={high:g}", f"{name}.threshold_a"
            )
        text, field = _image_text(unit, name)
        if text is None and init_image is None:
            raise LimitError(f"{name}: a unit needs an image (image or input_image, base64)", f"{name}.image")
        if text is None:
            picture = init_image
        else:
            picture = images.load_image(
                images.b64_bytes(text, settings, field), settings, field, width, height
            )
        if size is None:
            size = images.fit_size(picture.size, width, height, settings, field)
        picture = a1111.resize(picture, RESIZE_MODES[unit.resize_mode], *size)
        units[index] = ControlUnit(
            settings.controlnets[index][0],
            picture,
            scale=unit.weight,
            start=unit.guidance_start,
            end=unit.guidance_end,
            model=_HASH.sub("", unit.model or "") or None,
            module=module,
            low=low,
            high=high,
        )
    if all(u is None for u in units):
        return (), None
    return tuple(units), size


# ----------------------------------------------------------------------------------------------------------------------
# The OpenAPI description of the units (`lcmkit.server.openapi` adds it to alwayson_scripts)


def alwayson_schema(settings: Settings) -> dict[str, Any]:
    """`alwayson_scripts` as this server accepts it: the ControlNet entry, and (under "refuse") nothing else. With
    no net loaded, only disabled units are accepted."""
    off = {"type": "object", "properties": {"enabled": {"const": False}}, "required": ["enabled"]}
    unit = (
        off if not settings.controlnets else {"anyOf": [off, {"$ref": "#/components/schemas/ControlNetUnit"}]}
    )
    entry = {
        "type": "object",
        "properties": {"args": {"type": "array", "maxItems": MAX_UNITS, "items": unit}},
        "required": ["args"],
    }
    script = {"pattern": "^" + "".join(f"[{c.upper()}{c}]" for c in SCRIPT) + "$"}
    schema: dict[str, Any] = {"type": "object", "patternProperties": {script["pattern"]: entry}}
    if settings.unsupported == "refuse":
        schema["propertyNames"] = script
    return {"anyOf": [schema, {"type": "null"}]}


# ----------------------------------------------------------------------------------------------------------------------
# The extension's own routes


class DetectRequest(RequestBody):
    controlnet_module: Literal["none", "canny"] = "none"
    controlnet_input_images: list[str] = Field(default_factory=list, max_length=4)
    controlnet_processor_res: int = 512
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1


def _detect(body: DetectRequest, settings: Settings) -> dict[str, Any]:
    unit = ControlNetUnit(
        module=body.controlnet_module,
        threshold_a=body.controlnet_threshold_a,
        threshold_b=body.controlnet_threshold_b,
    )
    module = _module(unit, "controlnet_module")
    low, high = _thresholds(unit)
    if module == "canny" and low > high:
        raise LimitError(
            "controlnet_threshold_a must not exceed controlnet_threshold_b", "controlnet_threshold_a"
        )
    out = []
    for i, text in enumerate(body.controlnet_input_images):
        name = f"controlnet_input_images[{i}]"
        picture = images.load_image(images.b64_bytes(text, settings, name), settings, name)
        w, h = images.fit_size(picture.size, None, None, settings, name)
        picture = picture.resize((w, h), PIL.Image.Resampling.LANCZOS) if picture.size != (w, h) else picture
        made = canny(picture, low, high) if module == "canny" else picture
        buf = io.BytesIO()
        made.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return {"images": out, "info": "Success"}


def router(settings: Settings) -> APIRouter:
    api = APIRouter(tags=["controlnet"])

    @api.get("/controlnet/version")
    def version() -> dict[str, int]:
        """The sd-webui-controlnet API version this server speaks."""
        return {"version": API_VERSION}

    @api.get("/controlnet/model_list")
    def models(update: bool | None = None) -> dict[str, list[str]]:
        """The ControlNets loaded with `lcmkit serve --controlnet KIND=PATH_OR_ID` (empty without)."""
        return {"model_list": model_list(settings)}

    @api.get("/controlnet/module_list")
    def modules(alias_names: bool | None = None) -> dict[str, Any]:
        """The preprocessors this server runs: none (the image as it is) and canny."""
        detail = {
            "none": {"model_free": False, "sliders": []},
            "canny": {
                "model_free": False,
                "sliders": [
                    {"name": "Preprocessor resolution", "value": 512, "min": 64, "max": 2048},
                    {"name": "Canny Low Threshold", "value": 100, "min": 1, "max": 255},
                    {"name": "Canny High Threshold", "value": 200, "min": 1, "max": 255},
                ],
            },
        }
        return {"module_list": list(MODULES), "module_detail": detail}

    @api.post("/controlnet/detect")
    def detect(body: DetectRequest) -> dict[str, Any]:
        """Run a preprocessor (none or canny) on images: base64 PNGs back, at their own size floored to 8."""
        try:
            return _detect(body, settings)
        except LimitError as e:
            raise HTTPException(400, str(e)) from None

    return api
