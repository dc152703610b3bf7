"""OpenAI images API compatibility: which request fields lcmkit honours, and `POST /v1/images/edits`.

Both routes take the fields of the official `openai` SDK (`client.images.generate(...)`, `client.images.edit(...)`):

- honoured: prompt, n, size ("WIDTHxHEIGHT" in multiples of 8, or "auto"), response_format "b64_json",
  output_format png/jpeg/webp, output_compression (the JPEG/WebP quality; PNG is lossless, so it changes
  nothing there), background "auto"/"opaque" (lcmkit's images are opaque), quality "auto"/"standard",
  input_fidelity "low" (edits), plus lcmkit's own steps, guidance_scale, seed, negative_prompt and, on edits,
  strength (img2img denoising strength, default 0.8 as in the CLI).
- checked: `model` may be absent or name the served model (`GET /v1/models`); anything else is a 400 naming
  `model` and what is served, since answering with another model's images would mislead the client.
- without effect, accepted: user, safety_identifier (abuse-monitoring ids), moderation (lcmkit moderates nothing).
- not implemented, so refused or warned about under the server's `unsupported` policy (`lcmkit.server.compat`):
  quality other than auto/standard, style, background "transparent", complexity, frame_count/frame_duration_ms,
  svg, partial_images > 0, input_fidelity "high", a `markup` image, several images on edits (the first is used
  under "warn"), and every field OpenAI does not define, reported with OpenAI's own words ("Unrecognized request
  argument supplied: X").
- refused under either policy: response_format "url" (nothing is hosted), stream=true, output_format gif/svg,
  and a `mask` on edits (no inpainting).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import FormData, UploadFile

from lcmkit.request import GeneratedImage, GenerationRequest
from lcmkit.server import images, schemas
from lcmkit.server.compat import Review
from lcmkit.server.guards import check_text_lengths
from lcmkit.server.jobs import LimitError, Settings, check_limits

# lcmkit's own fields on top of OpenAI's
EXTENSIONS = ("steps", "guidance_scale", "seed", "negative_prompt")


def check_model(model: str | None, settings: Settings) -> None:
    served = [settings.model_name]
    if model is not None and model not in served:
        raise LimitError(
            f"model {model!r} is not served here; this server serves {served} (leave model out to use it)",
            "model",
        )


def _review_common(body: Any, review: Review) -> None:
    """The fields generations and edits share."""
    if body.quality not in (None, "auto", "standard"):
        review.add("quality", f"quality={body.quality!r} (lcmkit has one quality; steps sets the effort)")
    if body.background == "transparent":
        review.add("background", "background='transparent' (lcmkit's images are opaque)")
    if body.complexity is not None:
        review.add("complexity", f"complexity={body.complexity!r} (planning effort)")
    for name in ("frame_count", "frame_duration_ms", "svg"):
        if getattr(body, name) is not None:
            review.add(name, f"{name} (GIF/SVG output)")
    if body.partial_images:
        review.add("partial_images", f"partial_images={body.partial_images} (streamed partial images)")


def _unrecognized(names: list[str], review: Review, settings: Settings) -> None:
    for name in names:
        if len(name) > settings.max_text_chars:  # a name is text too, and the reply would repeat it
            raise LimitError(
                f"a field name of {len(name)} characters was sent; the limit is {settings.max_text_chars} "
                "(max_text_chars)"
            )
        review.add(name, f"Unrecognized request argument supplied: {name}")


def review_generation(body: Any, settings: Settings) -> list[str]:
    """Check `POST /v1/images/generations` fields (see the module doc); returns the warnings."""
    check_model(body.model, settings)
    review = Review(settings.unsupported)
    _unrecognized(sorted(body.model_extra or {}), review, settings)
    _review_common(body, review)
    if body.style is not None:
        review.add("style", f"style={body.style!r} (DALL-E 3 styles)")
    return review.finish()


# ----------------------------------------------------------------------------------------------------------------------
# POST /v1/images/edits


class EditFields(BaseModel):
    """The non-file fields of `POST /v1/images/edits` (multipart/form-data, as the `openai` SDK sends them).

    Form fields are text, so numbers arrive as "2" and booleans as "false": pydantic's lax mode converts them
    (unlike the JSON bodies' `guards.RequestBody`); NaN and infinities are still refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str
    model: str | None = None
    n: int | None = Field(1, description="images to make from the one input image")
    size: str | None = Field(
        None, description='"WIDTHxHEIGHT" (multiples of 8) to resize the input to, or "auto" to keep its size'
    )
    response_format: str | None = Field(None, description='only "b64_json": generated files are not hosted')
    output_format: str | None = Field(None, description="png (default), jpeg or webp")
    output_compression: int | None = Field(
        None, ge=0, le=100, description="JPEG/WebP quality; PNG is lossless"
    )
    stream: bool | None = None
    quality: Literal["low", "medium", "high", "xhigh", "max", "auto", "standard"] | None = None
    background: Literal["transparent", "opaque", "auto"] | None = None
    input_fidelity: Literal["high", "low"] | None = None
    complexity: Literal["low", "medium", "high"] | None = None
    frame_count: int | None = None
    frame_duration_ms: int | None = None
    svg: dict[str, Any] | None = None
    partial_images: int | None = Field(None, ge=0, le=3)
    user: str | None = None
    safety_identifier: str | None = None
    steps: int = Field(4, description="lcmkit extension: denoising steps")
    guidance_scale: float = Field(8.5, description="lcmkit extension")
    seed: int | None = Field(
        None, description="lcmkit extension: image i uses seed + i; none or -1 is random"
    )
    negative_prompt: str = Field("", description="lcmkit extension")
    strength: float = Field(
        0.8, description="lcmkit extension: how much of the image is repainted, in (0, 1]"
    )


FILE_FIELDS = ("image", "image[]", "mask", "markup")


@dataclass
class EditForm:
    """A parsed edits request: its fields, the uploaded image bytes (in order) and unknown field names."""

    fields: EditFields
    images: list[bytes]
    unknown: list[str]
    markup: bool


def _svg(form: FormData) -> dict[str, Any] | None:
    """The SDK sends nested `svg` as `svg[model]`, `svg[reasoning][effort]`; only whether it is there matters."""
    keys = [k for k in form if k.startswith("svg[")]
    return {k: form[k] for k in keys} if keys else None


async def read_edit_form(form: FormData, settings: Settings) -> EditForm:
    """Split the multipart form into files and fields, with the upload limit on each file; raise `LimitError`
    (or pydantic's `ValidationError`) on bad input."""
    if "mask" in form:
        raise LimitError("mask is not supported: lcmkit does not inpaint; send the image without a mask")
    uploads = [*form.getlist("image"), *form.getlist("image[]")]
    if not uploads:
        raise LimitError("image is required: send the image to edit as a file (multipart/form-data)")
    images = []
    for i, upload in enumerate(uploads):
        name = "image" if len(uploads) == 1 else f"image[{i}]"
        if not isinstance(upload, UploadFile):
            raise LimitError(f"{name} must be a file upload, not a text field")
        data = await upload.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise LimitError(f"{name} is larger than the upload limit of {settings.max_upload_bytes} bytes")
        images.append(data)
    values: dict[str, Any] = {}
    unknown = []
    known = set(EditFields.model_fields) | set(FILE_FIELDS)
    for key in form:
        if key in FILE_FIELDS or key.startswith("svg["):
            continue
        items = form.getlist(key)
        if any(isinstance(v, UploadFile) for v in items):
            raise LimitError(f"{key} must be a text field, not a file")
        if key not in known:
            unknown.append(key)
            continue
        values[key] = items[-1]
    if (svg := _svg(form)) is not None:
        values["svg"] = svg
    return EditForm(EditFields.model_validate(values), images, unknown, "markup" in form)


def review_edit(form: EditForm, settings: Settings) -> list[str]:
    """Check the edit's fields (see the module doc); returns the warnings."""
    body = form.fields
    check_model(body.model, settings)
    review = Review(settings.unsupported)
    _unrecognized(form.unknown, review, settings)
    if len(form.images) > 1:
        review.add("image", f"image: {len(form.images)} images (lcmkit edits one image; the first is used)")
    if form.markup:
        review.add("markup", "markup (a guide overlay)")
    _review_common(body, review)
    if body.input_fidelity not in (None, "low"):
        review.add(
            "input_fidelity", f"input_fidelity={body.input_fidelity!r} (use strength: lower keeps more)"
        )
    return review.finish()


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    """pydantic's errors as one OpenAI-style message, and the first field's name."""
    parts, first = [], None
    for err in e.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        first = first or where or None
        if err.get("type") == "extra_forbidden":
            parts.append(f"Unrecognized request argument supplied: {where}")
        else:
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts), first


# ----------------------------------------------------------------------------------------------------------------------
# Translation to a GenerationRequest, and the reply


def from_generation(body: schemas.OpenAIImageRequest, settings: Settings) -> schemas.Translated:
    """`POST /v1/images/generations`: the fields reviewed, then translated."""
    warnings = review_generation(body, settings)
    tr = schemas.from_openai(body, settings)
    tr.warnings, tr.output_compression = warnings, body.output_compression
    tr.output_format = body.output_format or "png"
    return tr


def from_edit(form: EditForm, settings: Settings) -> schemas.Translated:
    """`POST /v1/images/edits`: img2img from the first image, resized to `size` when it is given."""
    body = form.fields
    check_text_lengths(body, settings)
    warnings = review_edit(form, settings)
    schemas.check_openai_output(body)
    width, height = schemas.parse_size(body.size)
    image = images.load_image(form.images[0], settings, "image", width, height)  # limits checked first
    image = schemas.fit_image(image, width, height, settings)
    req = GenerationRequest(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        steps=body.steps,
        guidance_scale=body.guidance_scale,
        seed=schemas.request_seed(body.seed),
        width=image.width,
        height=image.height,
        num_images=1 if body.n is None else body.n,
        init_image=image,
        strength=body.strength,
    )
    check_limits(req, settings, batch_name="n")
    return schemas.Translated(
        req,
        warnings=warnings,
        output_format=body.output_format or "png",
        output_compression=body.output_compression,
    )


def response(tr: schemas.Translated, results: list[GeneratedImage]) -> dict[str, Any]:
    """OpenAI's ImagesResponse (`created`, `data[].b64_json`), plus `warnings` when settings were not honoured."""
    out = schemas.openai_response(results, tr.output_format, tr.output_compression)
    if tr.warnings:
        out["warnings"] = tr.warnings
    return out
