"""`POST /v1/images/edits` driven by the official `openai` SDK over real HTTP (uvicorn on loopback), serving the
tiny random LCM: the multipart form exactly as `client.images.edit(...)` sends it, one file or a list (`image[]`),
lcmkit's extra fields through `extra_body`, and the refusals (mask, several images, another model) as the SDK's
typed errors.
"""

from __future__ import annotations

import base64
import io

import openai
import PIL.Image
import pytest
from server_fakes import live_server, tiny_pipe

from lcmkit.server.app import create_app
from lcmkit.server.jobs import Settings

KEY = "edit-key"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipe()


@pytest.fixture(scope="module")
def base_url(pipe):
    app = create_app(pipe, Settings(api_key=KEY, model_name="tiny-lcm"))
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=60)


def png_file(tmp_path, size: tuple[int, int] = (64, 64), name: str = "in.png"):
    path = tmp_path / name
    image = PIL.Image.new("RGB", size, (200, 40, 40))
    image.paste((20, 40, 220), (0, 0, size[0] // 2, size[1]))
    image.save(path)
    return path


def decode(b64: str) -> PIL.Image.Image:
    im = PIL.Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def test_sdk_edit_one_file(client: openai.OpenAI, tmp_path) -> None:
    path = png_file(tmp_path, (80, 72))
    with open(path, "rb") as f:
        result = client.images.edit(
            image=f, prompt="a red square", n=2, size="64x96", model="tiny-lcm",
            extra_body={"seed": 5, "steps": 2, "strength": 0.5},
        )  # fmt: skip
    images = [decode(d.b64_json) for d in result.data]
    assert [im.size for im in images] == [(64, 96), (64, 96)] and images[0].format == "PNG"
    text = images[1].info["parameters"]
    assert text.startswith("a red square\n") and "Seed: 6" in text and "Denoising strength: 0.5" in text
    assert "Model: tiny-lcm" in text


def test_sdk_edit_is_img2img_of_the_input(pipe, client: openai.OpenAI, tmp_path) -> None:
    """The edit is exactly the img2img pipeline run on the uploaded image (same seed, strength, steps), at the
    input's own size when no `size` is given; another input gives another image."""
    import torch

    from lcmkit.pipelines.img2img import LatentConsistencyModelImg2ImgPipeline

    path = png_file(tmp_path)
    with open(path, "rb") as f:
        out = client.images.edit(image=f, prompt="x", extra_body={"seed": 1, "steps": 4, "strength": 0.5})
    served = decode(out.data[0].b64_json)
    direct = LatentConsistencyModelImg2ImgPipeline.from_pipe(pipe)(
        "x",
        image=PIL.Image.open(path).convert("RGB"),
        strength=0.5,
        num_inference_steps=4,
        guidance_scale=8.5,
        generator=[torch.Generator().manual_seed(1)],
    ).images[0]
    assert served.size == (64, 64) and served.tobytes() == direct.tobytes()
    other = tmp_path / "other.png"
    PIL.Image.new("RGB", (64, 64), (0, 255, 0)).save(other)
    with open(other, "rb") as f:
        out = client.images.edit(image=f, prompt="x", extra_body={"seed": 1, "steps": 4, "strength": 0.5})
    assert decode(out.data[0].b64_json).tobytes() != served.tobytes()


def test_sdk_edit_with_a_list_uses_image_brackets(client: openai.OpenAI, tmp_path) -> None:
    one = png_file(tmp_path, name="one.png")
    with open(one, "rb") as f:
        result = client.images.edit(image=[f], prompt="x", extra_body={"steps": 1})  # sent as image[]
    assert len(result.data) == 1
    two = png_file(tmp_path, name="two.png")
    with open(one, "rb") as a, open(two, "rb") as b, pytest.raises(openai.BadRequestError, match="2 images"):
        client.images.edit(image=[a, b], prompt="x")


def test_sdk_edit_refusals(base_url: str, client: openai.OpenAI, tmp_path) -> None:
    path = png_file(tmp_path)
    with open(path, "rb") as f, open(path, "rb") as m, pytest.raises(openai.BadRequestError, match="mask"):
        client.images.edit(image=f, mask=m, prompt="x")
    with (
        open(path, "rb") as f,
        pytest.raises(openai.BadRequestError, match="model 'gpt-image-1' is not served"),
    ):
        client.images.edit(image=f, prompt="x", model="gpt-image-1")
    with open(path, "rb") as f, pytest.raises(openai.BadRequestError, match="input_fidelity='high'"):
        client.images.edit(image=f, prompt="x", input_fidelity="high")
    with (
        open(path, "rb") as f,
        pytest.raises(openai.BadRequestError, match="Unrecognized request argument supplied: x"),
    ):
        client.images.edit(image=f, prompt="x", extra_body={"x": "1"})
    with pytest.raises(openai.BadRequestError, match="image is not an image"):
        client.images.edit(image=("x.png", b"not a png", "image/png"), prompt="x")
    wrong = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0)
    with open(path, "rb") as f, pytest.raises(openai.AuthenticationError):
        wrong.images.edit(image=f, prompt="x")
