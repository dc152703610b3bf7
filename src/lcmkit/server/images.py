"""Uploaded images, checked from what they declare before anything is decoded or resized.

A 190 KB PNG can declare 8000x8000 pixels (192 MB once decoded), and `width: 12000` on a 64x64 image asks for a
432 MB resize. So an upload is opened header-only (`PIL.Image.open` reads no pixels), its format, declared size and
the size the request will run at are checked against the limits, and only then is it decoded, once, at its own
size. Only the first frame of an animated or multi-frame file is decoded (as AUTOMATIC1111 does); frames are
never counted, since counting seeks through all of them. Formats are limited to the usual photo/web ones, so
that no exotic decoder (EPS would start Ghostscript) runs on a stranger's bytes.

Both dialects use these: A1111 `init_images` (base64) and OpenAI `/v1/images/edits` (multipart bytes).
"""

from __future__ import annotations

import base64
import binascii
import io

import PIL.Image

from lcmkit.server.jobs import LimitError, Settings, check_size

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError)  # what PIL's plugins raise on bad files


def b64_bytes(data: str, settings: Settings, name: str) -> bytes:
    """The bytes of base64 text, with or without a `data:image/...;base64,` prefix, within the upload limit."""
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if not header.endswith(";base64"):
            raise LimitError(f"{name} is a data: URL that is not base64 encoded", name)
    data = "".join(data.split())
    if len(data) * 3 // 4 > settings.max_upload_bytes:
        raise LimitError(f"{name} is larger than the upload limit of {settings.max_upload_bytes} bytes", name)
    try:
        return base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise LimitError(f"{name} is not valid base64: {e}", name) from None


def open_checked(raw: bytes, settings: Settings, name: str) -> PIL.Image.Image:
    """Open an upload header-only and check its size in bytes, format and declared pixels; nothing is decoded."""
    if len(raw) > settings.max_upload_bytes:
        raise LimitError(f"{name} is larger than the upload limit of {settings.max_upload_bytes} bytes", name)
    try:
        image = PIL.Image.open(io.BytesIO(raw), formats=ALLOWED_FORMATS)
    except PIL.Image.DecompressionBombError as e:
        raise LimitError(f"{name} declares too many pixels: {e}", name) from None
    except _PIL_ERRORS as e:
        why = "" if isinstance(e, PIL.UnidentifiedImageError) else f": {e}"
        raise LimitError(
            f"{name} is not an image PIL can read in a supported format ({', '.join(ALLOWED_FORMATS)}){why}",
            name,
        ) from None
    width, height = image.size
    if width < 1 or height < 1 or width * height > settings.max_input_pixels:
        image.close()
        raise LimitError(
            f"{name} declares {width}x{height} = {width * height} pixels; the limit is "
            f"{settings.max_input_pixels} (max_input_pixels)",
            name,
        )
    return image


def fit_size(
    size: tuple[int, int],
    width: int | None,
    height: int | None,
    settings: Settings,
    name: str = "the init image",
) -> tuple[int, int]:
    """The size an image of `size` is resized to (A1111 resize mode 0, "just resize"), checked against the limits.

    Both `width` and `height`: that size. One of them: the other follows the image's aspect ratio. Neither: the
    image's own size, floored to a multiple of 8. A 0 is refused like any size below the minimum.
    """
    if width is None and height is None:
        w, h = size[0] // 8 * 8, size[1] // 8 * 8
        for side, value, maximum in (("width", w, settings.max_width), ("height", h, settings.max_height)):
            try:
                check_size(side, value, settings, maximum)
            except LimitError as e:
                raise LimitError(
                    f"{name} is {size[0]}x{size[1]}: {e}; pass width and height to resize it", side
                ) from None
        return w, h
    if width is not None:
        check_size("width", width, settings, settings.max_width)
    if height is not None:
        check_size("height", height, settings, settings.max_height)
    if width is not None and height is not None:
        return width, height
    if width is not None:
        h = max(8, size[1] * width // size[0] // 8 * 8)
        _check_derived("height", h, settings, settings.max_height, size, name)
        return width, h
    assert height is not None
    w = max(8, size[0] * height // size[1] // 8 * 8)
    _check_derived("width", w, settings, settings.max_width, size, name)
    return w, height


def _check_derived(
    side: str, value: int, settings: Settings, maximum: int, size: tuple[int, int], name: str
) -> None:
    try:
        check_size(side, value, settings, maximum)
    except LimitError as e:
        raise LimitError(
            f"{e} ({side} follows the aspect ratio of {name}, {size[0]}x{size[1]}; pass both width and height)",
            side,
        ) from None


def load_image(
    raw: bytes, settings: Settings, name: str, width: int | None = None, height: int | None = None
) -> PIL.Image.Image:
    """Decode an upload to RGB at its own size, after checking its header and the size it will be resized to
    (`fit_size(image.size, width, height, ...)`), so that no limit is found out only after the work."""
    with open_checked(raw, settings, name) as image:
        fit_size(image.size, width, height, settings)
        try:
            return image.convert("RGB")  # the first frame only
        except _PIL_ERRORS as e:
            raise LimitError(f"{name} could not be decoded: {e}", name) from None
