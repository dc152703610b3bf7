"""The OpenAPI document (`/openapi.json`, `/docs`), made to tell the truth about this server as configured.

FastAPI derives a document from the request models, but the models are static while the limits come from `Settings`
(`lcmkit serve --limit ...`), and some rules span fields. So the app's document is generated once per app and then
corrected here, so that every request the document calls valid is accepted and every one it calls invalid is
refused (schemathesis checks both ways in tests/server/test_server_openapi.py):

- sizes (multiples of 8 within min_size..max_width/max_height, also in OpenAI's "WxH" strings), steps, guidance,
  strength, images per request; `batch_size x n_iter <= max_images` and `seed + images - 1 <= 2**32 - 1`
  are spelled out as alternatives (`anyOf`), since JSON Schema has no products;
- under the "refuse" policy, the honoured values of every A1111/OpenAI field lcmkit does not implement
  (`a1111.RULES`, the sampler, override_settings keys; OpenAI's unknown fields and partly honoured ones);
- the error replies of each dialect (400, 401 when a key is set, 408, 409, 413, 415, 422 for A1111, 500, 503)
  with their bodies: `{"error": {...}}` under /v1, `{"detail": ...}` elsewhere;
- the API-key security schemes (bearer token or X-API-Key), required only when a key is configured.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from lcmkit.request import MAX_SEED
from lcmkit.server import a1111, controlnet, openai_api
from lcmkit.server.jobs import Settings

NULL = {"type": "null"}


# ----------------------------------------------------------------------------------------------------------------------
# Reply models (documentation: the routes return dicts of exactly these shapes)


class OpenAIImage(BaseModel):
    b64_json: str


class OpenAIImagesResponse(BaseModel):
    """OpenAI's ImagesResponse."""

    created: int
    data: list[OpenAIImage]
    warnings: list[str] | None = Field(
        None, description="settings not honoured (only with --unsupported warn)"
    )


class A1111ImagesResponse(BaseModel):
    """A1111's TextToImageResponse / ImageToImageResponse."""

    images: list[str] = Field(description="base64 images (none when send_images is false)")
    parameters: dict[str, Any] = Field(description="the request, echoed")
    info: str = Field(description="a JSON object as a string: seeds, infotexts, sizes...")
    warnings: list[str] | None = Field(
        None, description="settings not honoured (only with --unsupported warn)"
    )


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    """OpenAI's error body, which the `openai` SDK parses into its typed exceptions."""

    error: OpenAIErrorDetail


class A1111Error(BaseModel):
    """FastAPI's (and A1111's) error body for everything but validation errors."""

    detail: str


def reply(model: type[BaseModel]) -> dict[str, Any]:
    """Route keywords that document `model` as the 200 reply without filtering what the route returns."""
    return {
        "response_model": None,
        "responses": {200: {"model": model, "description": "Successful Response"}},
    }


# ----------------------------------------------------------------------------------------------------------------------
# Pieces


def _size_pattern(low: int, high: int) -> str:
    return "(?:" + "|".join(str(v) for v in range(high, low - 1, -8)) + ")"


def size_pattern(settings: Settings) -> str:
    """OpenAI's `size`: "auto", or WIDTHxHEIGHT with each side a multiple of 8 within the limits."""
    w = _size_pattern(settings.min_size, settings.max_width)
    h = _size_pattern(settings.min_size, settings.max_height)
    return f"^(?:auto|{w}[xX]{h})$"


def _side(settings: Settings, maximum: int) -> dict[str, Any]:
    return {"type": "integer", "multipleOf": 8, "minimum": settings.min_size, "maximum": maximum}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, NULL]}


def _set(props: dict[str, Any], name: str, schema: dict[str, Any]) -> None:
    """Replace a property's type constraints, keeping its title, description and default."""
    if name not in props:
        return
    keep = {k: v for k, v in props[name].items() if k in ("title", "description", "default", "examples")}
    props[name] = {**schema, **keep}


def _also(props: dict[str, Any], name: str, schema: dict[str, Any]) -> None:
    """Add constraints to a property (JSON Schema keywords combine as AND)."""
    if name in props:
        props[name].setdefault("allOf", []).append(schema)


def _counts(settings: Settings, batch: str, iterations: str | None) -> dict[str, Any]:
    """`batch x iterations <= max_images` and `seed <= MAX_SEED - images + 1`, one alternative per combination.

    A field left out counts as 1, and an alternative constrains only the fields present, so each request matches
    the alternative of its own counts (or of larger ones, whose seed bound is tighter)."""
    alternatives = []
    for b in range(1, settings.max_images + 1):
        for n in range(1, settings.max_images // b + 1) if iterations else (1,):
            props: dict[str, Any] = {
                batch: {"enum": [b, None]} if b == 1 else {"const": b},
                "seed": {"anyOf": [{"type": "integer", "maximum": MAX_SEED - b * n + 1}, NULL]},
            }
            if iterations:
                props[iterations] = {"const": n} if n > 1 else {"enum": [1, None]}
            alternatives.append({"properties": props})
    return {"anyOf": alternatives}


def _bounded_json(limit: int) -> dict[str, Any]:
    """Any JSON value whose strings (object keys included), at any depth, have at most `limit` characters: what
    `guards.check_text_lengths` allows in a free-form field. Recursive, through `#/components/schemas/`."""
    ref = {"$ref": f"#/components/schemas/{_bounded_name(limit)}"}
    return {
        "anyOf": [
            {"type": "string", "maxLength": limit},
            {"type": ["number", "boolean", "null"]},
            {"type": "array", "items": ref},
            {"type": "object", "propertyNames": {"maxLength": limit}, "additionalProperties": ref},
        ]
    }


def _bounded_name(limit: int) -> str:
    return f"JSONWithTextUpTo{limit}"


def _bound_text(schema: dict[str, Any], limit: int, refs: set[int]) -> None:
    """Put `limit` on every string `schema` allows, at any depth (`refs` collects the recursive schemas used)."""
    if schema.get("type") == "string" and "format" not in schema:
        schema["maxLength"] = min(limit, schema.get("maxLength", limit))
    for key in ("anyOf", "allOf", "oneOf"):
        for sub in schema.get(key, []):
            _bound_text(sub, limit, refs)
    if isinstance(schema.get("items"), dict):
        _bound_text(schema["items"], limit, refs)
    if schema.get("type") == "object":
        schema["propertyNames"] = {"maxLength": limit}
        extra = schema.get("additionalProperties", True)
        if extra is True or extra == {}:
            schema["additionalProperties"] = {"$ref": f"#/components/schemas/{_bounded_name(limit)}"}
            refs.add(limit)
        elif isinstance(extra, dict):
            _bound_text(extra, limit, refs)
        for sub in schema.get("properties", {}).values():
            _bound_text(sub, limit, refs)
    elif schema.get("type") == "array" and schema.get("items") == {}:
        schema["items"] = {"$ref": f"#/components/schemas/{_bounded_name(limit)}"}
        refs.add(limit)


def _text_limits(schema: dict[str, Any], settings: Settings, refs: set[int]) -> None:
    """The length limits `guards.check_text_lengths` enforces: prompts `max_prompt_chars` (an infotext twice that),
    images and script payloads none, every other string `max_text_chars`, also inside lists and objects and in
    the names and values of fields a model keeps as extras."""
    from lcmkit.server.guards import PROMPT_FIELDS, UNBOUNDED_TEXT_FIELDS

    for name, prop in schema.get("properties", {}).items():
        if name in UNBOUNDED_TEXT_FIELDS:
            continue
        limit = settings.max_text_chars
        if name in PROMPT_FIELDS:
            limit = settings.max_prompt_chars * (2 if name == "infotext" else 1)
        _bound_text(prop, limit, refs)
    extra = schema.get("additionalProperties")
    if extra is True:
        schema["propertyNames"] = {"maxLength": settings.max_text_chars}
        schema["additionalProperties"] = {
            "$ref": f"#/components/schemas/{_bounded_name(settings.max_text_chars)}"
        }
        refs.add(settings.max_text_chars)


# ----------------------------------------------------------------------------------------------------------------------
# Request bodies


def _common_numbers(props: dict[str, Any], settings: Settings, guidance: str) -> None:
    from lcmkit.server.jobs import GUIDANCE_RANGE

    _set(props, "steps", {"type": "integer", "minimum": 1, "maximum": settings.max_steps})
    low, high = GUIDANCE_RANGE
    _set(props, guidance, {"type": "number", "minimum": low, "maximum": high})
    _also(props, "seed", {"anyOf": [{"type": "integer", "maximum": MAX_SEED}, NULL]})


def _a1111_body(schema: dict[str, Any], settings: Settings, img2img: bool) -> None:
    props = schema["properties"]
    _set(props, "width", _nullable(_side(settings, settings.max_width)))
    _set(props, "height", _nullable(_side(settings, settings.max_height)))
    _common_numbers(props, settings, "cfg_scale")
    _set(props, "batch_size", {"type": "integer", "minimum": 1, "maximum": settings.max_images})
    _set(props, "n_iter", {"type": "integer", "minimum": 1, "maximum": settings.max_images})
    constraints = [_counts(settings, "batch_size", "n_iter")]
    if img2img:
        _set(props, "denoising_strength", {"type": "number", "exclusiveMinimum": 0, "maximum": 1})
        _also(props, "init_images", {"minItems": 1})
    _set(props, "alwayson_scripts", controlnet.alwayson_schema(settings))
    refuse = settings.unsupported == "refuse"
    options = a1111.option_schemas(settings)
    if not refuse:
        options["sd_vae"] = {"type": "string"}  # another VAE is only warned about
    _set(
        props,
        "override_settings",
        _nullable({"type": "object", "properties": options, "additionalProperties": not refuse}),
    )
    if refuse:
        for rule in a1111.rules_for(img2img):
            _also(props, rule.name, rule.accepted)
        names = list(a1111.SAMPLER_NAMES)
        constraints.append(
            {
                "anyOf": [
                    {"properties": {"sampler_name": {"enum": names}}, "required": ["sampler_name"]},
                    {
                        "properties": {
                            "sampler_name": {"enum": ["", None]},
                            "sampler_index": {"enum": ["", None, *names]},
                        }
                    },
                ]
            }
        )
    schema["allOf"] = constraints


def _openai_fields(props: dict[str, Any], settings: Settings, refuse: bool) -> None:
    """What generations and edits share."""
    _set(props, "model", _nullable({"type": "string", "enum": [settings.model_name]}))
    _set(props, "n", _nullable({"type": "integer", "minimum": 1, "maximum": settings.max_images}))
    _set(props, "size", _nullable({"type": "string", "pattern": size_pattern(settings)}))
    _set(props, "response_format", _nullable({"type": "string", "enum": ["b64_json"]}))
    _set(props, "output_format", _nullable({"type": "string", "enum": ["png", "jpeg", "webp"]}))
    _set(props, "stream", {"enum": [False, None]})
    _common_numbers(props, settings, "guidance_scale")
    if refuse:
        _also(props, "quality", {"enum": ["auto", "standard", None]})
        _also(props, "background", {"enum": ["auto", "opaque", None]})
        _also(props, "partial_images", {"enum": [0, None]})
        for name in ("complexity", "frame_count", "frame_duration_ms", "svg", "style"):
            _also(props, name, NULL)


def _openai_body(schema: dict[str, Any], settings: Settings) -> None:
    refuse = settings.unsupported == "refuse"
    _openai_fields(schema["properties"], settings, refuse)
    schema[
        "additionalProperties"
    ] = not refuse  # unknown fields: 400 "Unrecognized request argument supplied"
    schema["allOf"] = [_counts(settings, "n", None)]


def edits_request_body(settings: Settings) -> dict[str, Any]:
    """`openapi_extra` of `POST /v1/images/edits`: its multipart form (the route parses the form itself)."""
    schema = copy.deepcopy(openai_api.EditFields.model_json_schema())
    props = schema["properties"]
    refuse = settings.unsupported == "refuse"
    _openai_fields(props, settings, refuse)
    _set(props, "strength", {"type": "number", "exclusiveMinimum": 0, "maximum": 1})
    if refuse:
        _also(props, "input_fidelity", {"enum": ["low", None]})
    binary = {"type": "string", "format": "binary"}
    props = {
        "image": {**binary, "description": "the image to edit (PNG, JPEG, WebP...)"},
        "image[]": {
            "type": "array",
            "items": binary,
            "maxItems": 1 if refuse else 16,
            "description": "the SDK's form for a list of images; lcmkit edits the first",
        },  # fmt: skip
        **props,
    }
    schema.update(properties=props, required=["prompt"], additionalProperties=not refuse)
    schema["allOf"] = [
        _counts(settings, "n", None),
        {
            "anyOf": [
                {"required": ["image"]},
                {"required": ["image[]"], "properties": {"image[]": {"minItems": 1}}},
            ]
        },
    ]
    schema.pop("title", None)
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


# ----------------------------------------------------------------------------------------------------------------------
# Errors and security


_ERRORS = {
    400: "the request is invalid: the message names the field and what is allowed",
    401: "no or a wrong API key",
    404: "no such job",
    408: "the request body took too long to arrive",
    409: "the job was interrupted before any image was finished",
    413: "the request body is larger than max_body_bytes",
    415: "the request body is neither JSON nor multipart/form-data",
    500: "generation failed",
    503: "the queue is full (see Retry-After) or the model is loading",
}


def _error_responses(path: str, operation: dict[str, Any], keyed: bool) -> None:
    openai = path.startswith("/v1/")
    ref = {"$ref": "#/components/schemas/" + ("OpenAIError" if openai else "A1111Error")}
    responses = operation.setdefault("responses", {})
    if openai:
        responses.pop("422", None)  # the OpenAI dialect answers validation errors with 400
    for status, description in _ERRORS.items():
        if status == 401 and not keyed:
            continue
        responses.setdefault(
            str(status), {"description": description, "content": {"application/json": {"schema": ref}}}
        )


def _security(document: dict[str, Any], keyed: bool) -> None:
    for methods in document["paths"].values():
        for operation in methods.values():
            if not keyed:
                operation.pop("security", None)  # no key configured: the API is open
    if not keyed:
        document.get("components", {}).pop("securitySchemes", None)


# ----------------------------------------------------------------------------------------------------------------------
# The document


def document(app: FastAPI, settings: Settings) -> dict[str, Any]:
    doc = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in (OpenAIError, OpenAIErrorDetail, A1111Error):
        schemas.setdefault(
            model.__name__, model.model_json_schema(ref_template="#/components/schemas/{model}")
        )
    if settings.controlnets:
        schemas["ControlNetUnit"] = controlnet.ControlNetUnit.model_json_schema(
            ref_template="#/components/schemas/{model}"
        )
    refs: set[int] = set()
    if "Txt2ImgRequest" in schemas:
        _a1111_body(schemas["Txt2ImgRequest"], settings, img2img=False)
    if "Img2ImgRequest" in schemas:
        _a1111_body(schemas["Img2ImgRequest"], settings, img2img=True)
    if "OpenAIImageRequest" in schemas:
        _openai_body(schemas["OpenAIImageRequest"], settings)
    for name in ("Txt2ImgRequest", "Img2ImgRequest", "OpenAIImageRequest"):
        if name in schemas:
            _text_limits(schemas[name], settings, refs)
    edits = doc["paths"].get("/v1/images/edits", {}).get("post")
    if edits is not None:
        _text_limits(edits["requestBody"]["content"]["multipart/form-data"]["schema"], settings, refs)
    for limit in refs:
        schemas[_bounded_name(limit)] = _bounded_json(limit)
    options = doc["paths"].get("/sdapi/v1/options", {}).get("post")
    if options is not None:
        refuse = settings.unsupported == "refuse"
        body = {
            "type": "object",
            "properties": a1111.option_schemas(settings),
            "additionalProperties": not refuse,
        }
        if not refuse:
            body["properties"]["sd_vae"] = {"type": "string"}
        options["requestBody"]["content"]["application/json"]["schema"] = body
    keyed = bool(settings.api_key)
    for path, methods in doc["paths"].items():
        for operation in methods.values():
            _error_responses(path, operation, keyed)
    _security(doc, keyed)
    return doc


def install(app: FastAPI, settings: Settings) -> None:
    """Serve `document(app, settings)` as the app's `/openapi.json` (built on first request, then kept)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
