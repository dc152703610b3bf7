"""Hostile input gets a 4xx naming the field, before any work, and the worker serves on (issue 17, items 1 and 3).

Proves on a fake pipeline: non-JSON content types, NaN/Infinity anywhere, numbers that overflow, lone surrogates and
invalid UTF-8, sizes of 0, booleans and other wrong types on either API are 4xx in each dialect's error shape with
the field named, and never reach the worker; free-text fields have length limits; a body over `max_body_bytes` is
413 from its Content-Length alone, or while it streams in (chunked, real uvicorn); a body trickled in is cut off
(408) and so is a request head trickled in (`uvicorn_options`); an uploaded image is checked from its header (a
190 KB PNG declaring 8000x8000 pixels, or `width: 12000` on a 64x64 image, is refused with less than 150 MB of peak
RSS growth, measured in a subprocess). A fuzz test posts arbitrary JSON values in every field of both APIs: never a
5xx, and every `info` parses as strict JSON.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import PIL.Image
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_fakes import FakePipe, live_server, tiny_pipe

from lcmkit.server import images, schemas
from lcmkit.server.app import create_app, uvicorn_options
from lcmkit.server.jobs import LimitError, Settings

LIMITS = Settings(max_width=256, max_height=256, max_steps=8, max_prompt_chars=50, max_text_chars=20)
JSON = {"content-type": "application/json"}


def png_bytes(size: tuple[int, int] = (64, 64), color: tuple[int, int, int] = (10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    PIL.Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_declaring(width: int, height: int) -> bytes:
    """A valid RGB PNG of `width` x `height` black pixels, compressed row by row so that building it never holds
    the decoded image (8000x8000 is 192 MB decoded, about 190 KB here)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = bytes(1 + 3 * width)  # filter byte 0, then black pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture
def fake() -> FakePipe:
    return FakePipe()


@pytest.fixture
def client(fake: FakePipe):
    with TestClient(create_app(fake, LIMITS)) as c:
        yield c


def raw(text: str | bytes, content_type: str | None = "application/json") -> dict[str, Any]:
    body = text.encode() if isinstance(text, str) else text
    return {"content": body, "headers": {"content-type": content_type} if content_type else {}}


def js(**fields: Any) -> dict[str, Any]:
    return {"json": fields}


TXT, IMG, OPENAI = "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/images/generations"
PNG64 = b64(png_bytes())

# (path, request, status, field the error must name; "" for the body as a whole with `hint` in its message)
HOSTILE = [
    # content types: curl -d sends application/x-www-form-urlencoded
    (TXT, raw("prompt=hi", "application/x-www-form-urlencoded"), 415, "Content-Type"),
    (TXT, raw('{"prompt": "hi"}', "text/plain"), 415, "Content-Type"),
    (TXT, raw('{"prompt": "hi"}', None), 415, "Content-Type"),
    (OPENAI, raw("prompt=hi", "application/x-www-form-urlencoded"), 415, "Content-Type"),
    (IMG, raw(b"--x\r\n\r\n--x--", "multipart/form-data; boundary=x"), 415, "Content-Type"),
    # NaN / Infinity / overflow anywhere
    (TXT, raw('{"prompt": "x", "cfg_scale": NaN}'), 400, "cfg_scale"),
    (TXT, raw('{"prompt": "x", "cfg_scale": -Infinity}'), 400, "cfg_scale"),
    (TXT, raw('{"prompt": "x", "cfg_scale": 1e400}'), 400, "cfg_scale"),
    (TXT, raw('{"prompt": "x", "not_a_field": {"a": [1, Infinity]}}'), 400, "not_a_field.a[1]"),
    (TXT, raw('{"prompt": "x", "seed": 1' + "0" * 60 + "}"), 400, "seed"),
    (TXT, raw('{"prompt": "x", "cfg_scale": "nan"}'), 422, "cfg_scale"),
    (TXT, js(prompt="x", cfg_scale=1e308), 400, "cfg_scale"),
    (TXT, js(prompt="x", cfg_scale=-1), 400, "cfg_scale"),
    (IMG, raw('{"prompt": "x", "init_images": ["a"], "denoising_strength": NaN}'), 400, "denoising_strength"),
    (OPENAI, raw('{"prompt": "x", "guidance_scale": NaN}'), 400, "guidance_scale"),
    (OPENAI, raw('{"prompt": "x", "guidance_scale": 1e999}'), 400, "guidance_scale"),
    (OPENAI, raw('{"prompt": "x", "n": 1' + "0" * 60 + "}"), 400, "n"),
    # lone surrogates and invalid UTF-8
    (TXT, raw('{"prompt": "\\ud800"}'), 400, "prompt"),
    (TXT, raw(b'{"prompt": "x", "negative_prompt": "caf\xe9"}'), 400, "negative_prompt"),
    (TXT, raw('{"prompt": "x", "styles": ["ok", "\\udfff"]}'), 400, "styles[1]"),
    (OPENAI, raw('{"prompt": "\\udc80 tail"}'), 400, "prompt"),
    (OPENAI, raw(b'{"prompt": "\xff\xfe"}'), 400, "prompt"),
    # sizes of 0 given alone
    (TXT, js(prompt="x", width=0), 400, "width"),
    (TXT, js(prompt="x", height=0), 400, "height"),
    (IMG, js(prompt="x", init_images=[PNG64], height=0), 400, "height"),
    (IMG, js(prompt="x", init_images=[PNG64], width=0), 400, "width"),
    (IMG, js(prompt="x", init_images=[PNG64], height=8), 400, "height"),
    (OPENAI, js(prompt="x", size="0x64"), 400, "size"),
    # wrong types
    (TXT, js(prompt="x", steps=True), 422, "steps"),
    (TXT, js(prompt="x", steps="4"), 422, "steps"),
    (TXT, js(prompt="x", tiling=0), 422, "tiling"),
    (OPENAI, js(prompt="x", stream=0), 400, "stream"),
    (TXT, js(prompt="x", batch_size="two"), 422, "batch_size"),
    (TXT, js(prompt=["x"]), 422, "prompt"),
    (TXT, js(prompt="x", force_task_id=7), 422, "force_task_id"),
    (IMG, js(prompt="x", init_images=[5]), 422, "init_images"),
    (IMG, js(prompt="x", init_images=PNG64), 422, "init_images"),
    (OPENAI, js(prompt="x", n=True), 400, "n"),
    (OPENAI, js(prompt="x", size=512), 400, "size"),
    (OPENAI, js(prompt={"text": "x"}), 400, "prompt"),
    (OPENAI, js(prompt="x", steps=2.5), 400, "steps"),
    # lengths (LIMITS: prompts 50 characters, other text 20)
    (TXT, js(prompt="p" * 51), 400, "prompt"),
    (TXT, js(prompt="x", negative_prompt="n" * 51), 400, "negative_prompt"),
    (TXT, js(prompt="x", force_task_id="t" * 21), 400, "force_task_id"),
    (TXT, js(prompt="x", sampler_name="s" * 21), 400, "sampler_name"),
    (OPENAI, js(prompt="p" * 51), 400, "prompt"),
    (OPENAI, js(prompt="x", user="u" * 21), 400, "user"),
    (OPENAI, js(prompt="x", model="m" * 21), 400, "model"),
    (OPENAI, js(prompt="x", size="5" * 21), 400, "size"),
    # not JSON at all, or JSON too deep
    (TXT, raw('{"prompt": '), 400, ""),
    (OPENAI, raw("[" * 100_000 + "]" * 100_000), 400, ""),
]


def named(path: str, reply: httpx.Response, field: str) -> bool:
    """Whether the error names `field`: OpenAI's `param` (or its message, for the body as a whole); A1111's
    `detail` message, or a `loc` of FastAPI's 422 list."""
    body = reply.json()
    if path.startswith("/v1/"):
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        return err["param"] == field or (err["param"] is None and field in err["message"])
    detail = body["detail"]
    if isinstance(detail, str):
        return field in detail
    return any(field == ".".join(str(p) for p in err["loc"][1:2]) for err in detail)


@pytest.mark.parametrize(("path", "request_kwargs", "status", "field"), HOSTILE)
def test_hostile_bodies_are_4xx_naming_the_field(
    client: TestClient, fake: FakePipe, path: str, request_kwargs: dict, status: int, field: str
) -> None:
    reply = client.post(path, **request_kwargs)
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    if field:
        assert named(path, reply, field), reply.text
    elif path.startswith("/v1/"):
        assert "JSON" in reply.json()["error"]["message"]
    else:
        assert "JSON" in reply.json()["detail"]
    assert fake.calls == []  # refused before the worker
    ok = client.post(OPENAI if path.startswith("/v1/") else TXT, json={"prompt": "fine"})
    assert ok.status_code == 200, ok.text  # and the worker serves the next request


def test_text_at_the_limit_is_accepted(client: TestClient) -> None:
    body = {"prompt": "p" * 50, "negative_prompt": "n" * 50, "force_task_id": "t" * 20, "steps": 1}
    assert client.post(TXT, json=body).status_code == 200


# ----------------------------------------------------------------------------------------------------------------------
# Body size and slow clients


def test_a_body_over_max_body_bytes_is_413_before_parsing(fake: FakePipe) -> None:
    with TestClient(create_app(fake, Settings(max_body_bytes=1000))) as client:
        big = json.dumps({"prompt": "x" * 2000}).encode()
        for path in (TXT, OPENAI):
            reply = client.post(path, content=big, headers=JSON)
            assert reply.status_code == 413 and reply.headers["connection"] == "close"
            message = reply.json()["error"]["message"] if path == OPENAI else reply.json()["detail"]
            assert f"of {len(big)} bytes is larger than the limit of 1000 bytes (max_body_bytes)" in message
        assert fake.calls == []
        assert client.post(TXT, json={"prompt": "x" * 900}).status_code == 200


def _connect(base: str) -> socket.socket:
    url = urlsplit(base)
    return socket.create_connection((url.hostname, url.port), timeout=15)


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_a_chunked_body_is_counted_while_it_streams_and_cut_off_at_the_limit(fake: FakePipe) -> None:
    app = create_app(fake, Settings(max_body_bytes=1000))
    with live_server(app) as url, _connect(url) as sock:
        head = f"POST {TXT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        sock.sendall(head.encode())
        for _ in range(
            2
        ):  # 1200 bytes, and never the closing 0-length chunk: the server must not wait for it
            sock.sendall(b"258\r\n" + b" " * 600 + b"\r\n")
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert b"larger than the limit of 1000 bytes (max_body_bytes)" in reply
    assert fake.calls == []


def test_a_body_trickled_in_is_cut_off_with_408(fake: FakePipe) -> None:
    app = create_app(fake, Settings(body_timeout_s=1))
    with live_server(app) as url, _connect(url) as sock:
        sock.sendall(f"POST {TXT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode())
        sock.sendall(b"Content-Length: 100\r\n\r\n" + b'{"prompt": "')  # 12 of 100 bytes, then nothing
        start = time.monotonic()
        reply = _read_all(sock)
        waited = time.monotonic() - start
    assert reply.startswith(b"HTTP/1.1 408 ") and b"body_timeout_s" in reply
    assert waited < 10  # cut off by the server (1 s), not by this socket's own 15 s timeout
    assert fake.calls == []


def test_uvicorn_options_close_connections_that_trickle_their_head(fake: FakePipe) -> None:
    """`uvicorn_options` times out request heads (uvicorn itself waits for ever) and still serves keep-alive."""
    limits = Settings(header_timeout_s=1, keep_alive_s=2, max_connections=8, max_header_bytes=4096)
    options = uvicorn_options(limits)
    assert {"timeout_keep_alive", "limit_concurrency", "h11_max_incomplete_event_size"} <= set(options)
    with live_server(create_app(fake, limits), **options) as url:
        with _connect(url) as silent, _connect(url) as slow:
            slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the head never ends
            start = time.monotonic()
            assert _read_all(silent) == b"" and _read_all(slow) == b""  # both closed without an answer
            assert time.monotonic() - start < 10
        with _connect(url) as big:
            big.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 8000)  # unfinished, too long
            assert _read_all(big).startswith(b"HTTP/1.1 400 ")  # h11 refuses a head over max_header_bytes
        with httpx.Client(base_url=url, timeout=10) as client:  # one kept-alive connection, several requests
            for _ in range(3):
                assert client.get("/health").status_code == 200
            assert client.post(TXT, json={"prompt": "p"}).status_code == 200


# ----------------------------------------------------------------------------------------------------------------------
# Uploaded images


RSS_SCRIPT = textwrap.dedent(
    """
    import base64, io, json, resource, sys
    sys.path.insert(0, sys.argv[1])
    import PIL.Image
    from fastapi.testclient import TestClient
    from server_fakes import FakePipe
    from lcmkit.server.app import create_app
    from lcmkit.server.jobs import Settings

    bomb = open(sys.argv[2]).read()
    buf = io.BytesIO()
    PIL.Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    small = base64.b64encode(buf.getvalue()).decode()
    with TestClient(create_app(FakePipe(), Settings())) as client:
        def img2img(image, **extra):
            return client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [image], **extra})
        # warm up every code path the measured requests take: a decode, a refusal before and after it
        warm = [img2img(small, denoising_strength=0).status_code, img2img(small, width=12).status_code]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        replies = [img2img(bomb), img2img(small, width=12000), img2img(small, width=64, height=12000)]
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"warm": warm, "status": [r.status_code for r in replies],
                      "detail": [r.json()["detail"] for r in replies], "growth_mb": (after - before) / 1024}))
    """
)


def test_images_are_checked_from_their_header_before_any_decoding(tmp_path: Path) -> None:
    bomb = png_declaring(8000, 8000)
    assert len(bomb) < 250_000  # ~190 KB on the wire, 192 MB decoded
    (tmp_path / "bomb.b64").write_text(b64(bomb))
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parents[1] / "src"), str(here)])}
    run = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(here), str(tmp_path / "bomb.b64")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["warm"] == [400, 400]
    assert out["status"] == [400, 400, 400], out["detail"]
    assert (
        "declares 8000x8000 = 64000000 pixels" in out["detail"][0] and "max_input_pixels" in out["detail"][0]
    )
    assert "width must be a multiple of 8 between 64 and 1024, got 12000" in out["detail"][1]
    assert "height must be a multiple of 8 between 64 and 1024, got 12000" in out["detail"][2]
    assert out["growth_mb"] < 150, out


def test_declared_pixels_formats_and_bombs_are_refused(client: TestClient) -> None:
    def img2img(data: bytes, **extra: Any) -> httpx.Response:
        return client.post(IMG, json={"prompt": "x", "init_images": [b64(data)], **extra})

    small_limit = Settings(max_input_pixels=64 * 64)
    with pytest.raises(
        LimitError, match="declares 65x64 = 4160 pixels; the limit is 4096 .max_input_pixels."
    ):
        images.open_checked(png_bytes((65, 64)), small_limit, "image")
    reply = img2img(png_declaring(20_000, 20_000))  # past PIL's own decompression-bomb limit too
    assert reply.status_code == 400 and "init_images[0] declares" in reply.json()["detail"]
    buf = io.BytesIO()
    PIL.Image.new("RGB", (64, 64)).save(buf, format="TIFF")
    reply = img2img(buf.getvalue())
    assert (
        reply.status_code == 400 and "supported format (PNG, JPEG, WEBP, BMP, GIF)" in reply.json()["detail"]
    )
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n"  # would run Ghostscript if PIL tried it
    assert img2img(eps).status_code == 400


def test_only_the_first_frame_of_an_animation_is_decoded() -> None:
    frames = [PIL.Image.new("RGB", (64, 64), (r, 0, 0)) for r in (200, 100, 50)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=10)
    image = images.load_image(buf.getvalue(), Settings(), "init_images[0]")
    assert image.mode == "RGB" and image.size == (64, 64) and image.getpixel((3, 3))[0] == 200


@pytest.mark.parametrize(
    ("size", "width", "height", "expected"),
    [((64, 64), None, None, (64, 64)), ((100, 50), 128, None, (128, 64)), ((100, 50), None, 64, (128, 64))],
)
def test_fit_size_follows_the_aspect_ratio(size, width, height, expected) -> None:
    assert images.fit_size(size, width, height, Settings()) == expected


def test_decode_image_checks_the_requested_size_first() -> None:
    with pytest.raises(LimitError, match="width must be a multiple of 8 between 64 and 1024, got 12000"):
        schemas.decode_image(b64(png_bytes()), Settings(), "init_images[0]", 12000, 64)


# ----------------------------------------------------------------------------------------------------------------------
# Fuzzing every field


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} in info")

    return json.loads(text, parse_constant=refuse)


NASTY_TEXT = st.sampled_from(
    ["", "\ud800", "\x00", "é" * 30, "512x512", "auto", "-1", "NaN", "LCM", "a" * 300]
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | NASTY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
A1111_FIELDS = sorted(schemas.Txt2ImgRequest.model_fields)
OPENAI_FIELDS = sorted(schemas.OpenAIImageRequest.model_fields)


IMG2IMG_FIELDS = sorted(set(schemas.Img2ImgRequest.model_fields) - set(schemas.A1111Request.model_fields))


def _fuzz(client: TestClient, path: str, field: str, value: Any) -> None:
    body = {"prompt": "p", "steps": 1, **({"init_images": [PNG64]} if path == IMG else {}), field: value}
    reply = client.post(path, content=json.dumps(body).encode(), headers=JSON)  # NaN, lone surrogates escaped
    assert reply.status_code < 500, (field, value, reply.text)
    payload = reply.json()
    if reply.status_code == 200 and path != OPENAI:
        _strict_json(payload["info"])
    elif reply.status_code >= 400:
        assert ("error" if path == OPENAI else "detail") in payload


def test_fuzz_img2img_fields_on_the_tiny_model_never_5xx() -> None:
    """img2img runs the real pipeline (the fake has no img2img), so values that pass every check really run."""
    limits = Settings(max_width=64, max_height=64, max_steps=2, max_batch=1, max_images=1)
    with TestClient(create_app(tiny_pipe(), limits)) as client:

        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
        @given(field=st.sampled_from(IMG2IMG_FIELDS), value=JSON_VALUES)
        def check(field: str, value: Any) -> None:
            _fuzz(client, IMG, field, value)

        check()
        assert (
            client.post(IMG, json={"prompt": "still serving", "steps": 1, "init_images": [PNG64]}).status_code
            == 200
        )


@pytest.mark.parametrize(
    ("path", "fields"), [(TXT, A1111_FIELDS), (OPENAI, OPENAI_FIELDS)], ids=["a1111", "openai"]
)
def test_fuzz_every_field_never_5xx(path: str, fields: list[str]) -> None:
    fake = FakePipe()
    with TestClient(create_app(fake, Settings(max_width=128, max_height=128, max_steps=4))) as client:

        @settings(
            max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
        )
        @given(field=st.sampled_from(fields), value=JSON_VALUES)
        def check(field: str, value: Any) -> None:
            _fuzz(client, path, field, value)

        check()
        assert client.post(path, json={"prompt": "still serving", "steps": 1}).status_code == 200
