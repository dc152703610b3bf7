"""Real clients over real HTTP: the official `openai` package and plain httpx against uvicorn on loopback,
serving the tiny random LCM built by `build_tiny_lcm`.

Proves that a client we did not write parses our replies and errors (OpenAI's own response and error models),
that the API key travels as the OpenAI SDK sends it, that seeds make generations reproducible end to end, and
that img2img (base64 with and without a data: URL prefix) runs through the real img2img pipeline.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import openai
import PIL.Image
import pytest
from server_fakes import live_server, tiny_pipe

from lcmkit.server.app import create_app
from lcmkit.server.jobs import Settings

KEY = "test-key-123"


@pytest.fixture(scope="module")
def base_url():
    app = create_app(tiny_pipe(), Settings(api_key=KEY, model_name="tiny-lcm"))
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=60)


def decode(b64: str) -> PIL.Image.Image:
    im = PIL.Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def test_openai_sdk_generates_a_png(client: openai.OpenAI) -> None:
    result = client.images.generate(
        model="tiny-lcm", prompt="a red circle", size="64x64", response_format="b64_json"
    )
    assert isinstance(result.created, int) and len(result.data) == 1
    image = decode(result.data[0].b64_json)
    assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
    assert "Model: tiny-lcm" in image.info["parameters"]


def test_openai_sdk_extra_fields_make_it_reproducible(client: openai.OpenAI) -> None:
    def once() -> list[bytes]:
        res = client.images.generate(
            model="tiny-lcm", prompt="a cat", size="64x64", n=2, response_format="b64_json",
            extra_body={"seed": 42, "steps": 2, "guidance_scale": 6.0},
        )  # fmt: skip
        return [decode(d.b64_json).tobytes() for d in res.data]

    a, b = once(), once()
    assert a == b  # same seed, same pixels
    assert a[0] != a[1]  # image 1 uses seed 43


def test_openai_sdk_raises_typed_errors(base_url: str, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="only 'b64_json'"):
        client.images.generate(model="tiny-lcm", prompt="x", size="64x64", response_format="url")
    with pytest.raises(openai.BadRequestError, match="multiple of 8"):
        client.images.generate(model="tiny-lcm", prompt="x", size="60x64", response_format="b64_json")
    wrong = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="not valid"):
        wrong.images.generate(model="tiny-lcm", prompt="x", size="64x64", response_format="b64_json")


def png_b64(size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    PIL.Image.new("RGB", size, (200, 40, 40)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize(
    ("init", "size", "expected"),
    [
        ("data:image/png;base64," + png_b64((64, 64)), {}, (64, 64)),
        (png_b64((80, 72)), {"width": 64, "height": 96}, (64, 96)),  # resized as A1111's "just resize"
    ],
    ids=["data-url", "plain-resized"],
)
def test_img2img_over_http(base_url: str, init: str, size: dict, expected: tuple[int, int]) -> None:
    body = {
        "prompt": "a red square",
        "init_images": [init],
        "denoising_strength": 0.5,
        "steps": 2,
        "seed": 9,
        **size,
    }
    r = httpx.post(f"{base_url}/sdapi/v1/img2img", json=body, headers={"X-API-Key": KEY}, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    info = json.loads(out["info"])
    assert info["all_seeds"] == [9] and info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in info["infotexts"][0]
    assert out["parameters"]["init_images"] is None
    assert decode(out["images"][0]).size == expected
