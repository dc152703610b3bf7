"""PNG info: the parameters text ("infotext") that A1111 and lcmkit write into images, read back and parsed.

A1111 writes it into a PNG's `parameters` text chunk, or a JPEG/WebP's EXIF UserComment: the prompt (any number of
lines), an optional "Negative prompt: ..." (also any number of lines), and a last line of `Key: value` pairs
separated by commas, where a value holding commas is a JSON string in double quotes. `POST /sdapi/v1/png-info`
answers with the text, the image's other text chunks and the parsed pairs, in A1111's shape.
"""

from __future__ import annotations

import json
import re
from typing import Any

import PIL.Image

from lcmkit.server import images
from lcmkit.server.jobs import Settings


def _pairs(line: str) -> list[tuple[str, str]] | None:
    """`Key: value, Key: "quoted, value", ...` as pairs, or None when the line is not such a list."""
    pairs: list[tuple[str, str]] = []
    decoder = json.JSONDecoder()
    i, n = 0, len(line)
    while i < n:
        colon = line.find(":", i)
        if colon < 0:
            return None
        key = line[i:colon].strip()
        if not key or not re.fullmatch(r"\w[\w \-/]*", key):
            return None
        j = colon + 1
        while j < n and line[j] == " ":
            j += 1
        if j < n and line[j] == '"':
            try:
                value, end = decoder.raw_decode(line, j)
            except json.JSONDecodeError:
                return None
            value = str(value)
            rest = line[end:].lstrip(" ")
            if rest and not rest.startswith(","):
                return None
            i = n - len(rest) + 1
        else:
            end = line.find(",", j)
            end = n if end < 0 else end
            value = line[j:end].strip()
            i = end + 1
        pairs.append((key, value))
        while i < n and line[i] == " ":
            i += 1
    return pairs


def parse_infotext(text: str) -> dict[str, str]:
    """A1111's `parse_generation_parameters` shape: "Prompt", "Negative prompt" and one entry per `Key: value` of
    the last line, values as text; a `WxH` value becomes "Key-1" and "Key-2" (so "Size-1" is the width)."""
    lines = text.strip().split("\n")
    params = _pairs(lines[-1]) if lines else None
    if params is not None and len(params) >= 3:
        lines = lines[:-1]
    else:
        params = []
    prompt: list[str] = []
    negative: list[str] | None = None
    for line in lines:
        line = line.strip()
        if negative is None and line.startswith("Negative prompt:"):
            negative = [line.removeprefix("Negative prompt:").strip()]
        elif negative is not None:
            negative.append(line)
        else:
            prompt.append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative or [])}
    for key, value in params:
        size = re.fullmatch(r"(\d+)x(\d+)", value)
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size[1], size[2]
        else:
            out[key] = value
    return out


def _exif_comment(image: PIL.Image.Image) -> str | None:
    """The EXIF UserComment, where A1111 writes the parameters of JPEG and WebP images."""
    try:
        raw = image.getexif().get_ifd(0x8769).get(0x9286)
    except Exception:  # a broken EXIF block is no infotext
        return None
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes) or len(raw) < 8:
        return None
    prefix, body = raw[:8], raw[8:]
    if prefix == b"UNICODE\0":
        encoding = "utf-16-le" if body[:1] != b"\0" and body[1:2] == b"\0" else "utf-16-be"
        return body.decode(encoding, "replace")
    return body.decode("utf-8", "replace")


def png_info(data: str, settings: Settings) -> dict[str, Any]:
    """`POST /sdapi/v1/png-info`: the infotext of a base64 image, its other text chunks, and the parsed parameters.

    Reads metadata only: the pixels are never decoded, so a huge image costs no memory.
    """
    if not data.strip():
        return {"info": "", "items": {}, "parameters": {}}
    raw = images.b64_bytes(data.strip(), settings, "image")
    with images.open_checked(raw, settings, "image") as image:  # header only: no pixels are decoded
        items = {k: v for k, v in image.info.items() if isinstance(v, str)}
        info = items.pop("parameters", None)
        if info is None:
            info = _exif_comment(image)
    info = info or ""
    return {"info": info, "items": items, "parameters": parse_infotext(info) if info else {}}
