"""ControlNet on the server: A1111 `alwayson_scripts.controlnet` units, the extension's /controlnet/* routes and
`lcmkit serve --controlnet`.

The image a unit makes is the image the pipeline makes when called directly with the same control image, weight,
start/end and seed (array-equal: same process, same weights, same CPU kernels); bad units are 4xx naming the field.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from fastapi.testclient import TestClient
from server_fakes import FakePipe, tiny_model_dir

from lcmkit import LatentConsistencyModelPipeline, cli
from lcmkit.config import ControlNetConfig, UNetConfig
from lcmkit.control import ControlUnit, canny
from lcmkit.models.controlnet import ControlNetModel
from lcmkit.request import GenerationRequest, batch_key
from lcmkit.server.app import create_app
from lcmkit.server.jobs import Settings

LIMITS = dict(min_size=16, max_width=64, max_height=64, model_name="tiny")
PROMPT = "a red square"


def _controlnet(folder: Path, seed: int = 0, **changes) -> Path:
    """A random ControlNet for the tiny UNet, every weight perturbed (zero convolutions would hide mistakes)."""
    model = tiny_model_dir()
    unet = UNetConfig.from_diffusers(json.loads((model / "unet" / "config.json").read_text()))
    levels = len(json.loads((model / "vae" / "config.json").read_text())["block_out_channels"])
    fields = {f.name: getattr(unet, f.name) for f in dataclasses.fields(UNetConfig)}
    config = ControlNetConfig(
        **{**fields, "time_cond_proj_dim": None, **changes}, conditioning_embedding_out_channels=(8,) * levels
    )
    torch.manual_seed(seed)
    net = ControlNetModel(config)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    net.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def net_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _controlnet(tmp_path_factory.mktemp("cn") / "my_canny_net")


@pytest.fixture(scope="module")
def pipe(net_folder: Path) -> LatentConsistencyModelPipeline:
    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny_model_dir(), controlnet=str(net_folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def client(pipe, net_folder: Path):
    settings = Settings(**LIMITS, controlnets=(("canny", str(net_folder)),))
    with TestClient(create_app(pipe, settings)) as c:
        yield c


def picture(size=(32, 32), seed: int = 0) -> PIL.Image.Image:
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[size[1] // 4 : 3 * size[1] // 4, size[0] // 4 : 3 * size[0] // 4] = 255
    pixels += np.random.default_rng(seed).integers(0, 40, pixels.shape, dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def b64(image: PIL.Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def body(*units: dict, **fields) -> dict:
    out = dict(prompt=PROMPT, steps=2, seed=5, width=32, height=32, **fields)
    if units:
        out["alwayson_scripts"] = {"controlnet": {"args": list(units)}}
    return out


def unit(**fields) -> dict:
    return {"enabled": True, "image": b64(picture()), "module": "none", "model": "canny", **fields}


def pixels(reply: dict) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(reply["images"][0]))))


def direct(pipe, control_image, scale=1.0, start=0.0, end=1.0) -> np.ndarray:
    image = pipe(
        PROMPT,
        width=32,
        height=32,
        num_inference_steps=2,
        guidance_scale=8.5,
        generator=[torch.Generator().manual_seed(5)],
        control_image=[control_image],
        controlnet_conditioning_scale=[scale],
        control_guidance_start=[start],
        control_guidance_end=[end],
    ).images[0]
    return np.asarray(image)


def test_unit_makes_the_pipelines_image(client: TestClient, pipe) -> None:
    u = unit(weight=0.7, guidance_start=0.0, guidance_end=0.5, model="my_canny_net [0123abcd]")
    r = client.post("/sdapi/v1/txt2img", json=body(u))
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(pixels(r.json()), direct(pipe, picture(), 0.7, 0.0, 0.5))
    full = client.post("/sdapi/v1/txt2img", json=body(unit(weight=0.7)))
    assert not np.array_equal(pixels(full.json()), pixels(r.json()))  # guidance_end reached the pipeline
    info = json.loads(r.json()["info"])["infotexts"][0]
    assert 'ControlNet 0: "Module: none, Model: my_canny_net, Weight: 0.7, Guidance Start: 0' in info


def test_canny_module_uses_its_thresholds(client: TestClient, pipe) -> None:
    r = client.post("/sdapi/v1/txt2img", json=body(unit(module="canny", threshold_a=50, threshold_b=150)))
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(pixels(r.json()), direct(pipe, canny(picture(), 50, 150)))
    assert not np.array_equal(pixels(r.json()), direct(pipe, picture()))
    assert "Threshold A: 50, Threshold B: 150" in json.loads(r.json()["info"])["infotexts"][0]


def test_disabled_unit_and_no_unit_make_the_plain_image(client: TestClient, net_folder: Path) -> None:
    plain_pipe = LatentConsistencyModelPipeline.from_pretrained(tiny_model_dir())
    plain = plain_pipe(
        PROMPT, width=32, height=32, num_inference_steps=2, generator=[torch.Generator().manual_seed(5)]
    ).images[0]
    for request in (body(), body(unit(enabled=False, image="not base64 at all", weight=99))):
        r = client.post("/sdapi/v1/txt2img", json=request)
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()), np.asarray(plain))


def test_size_follows_the_control_image_and_resize_modes(client: TestClient) -> None:
    request = body(unit(image=b64(picture((48, 40))), resize_mode="Just Resize"))
    del request["width"], request["height"]
    r = client.post("/sdapi/v1/txt2img", json=request)
    assert r.status_code == 200, r.text
    assert PIL.Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).size == (48, 40)
    for mode in (0, 1, 2, "Crop and Resize", "Resize and Fill", "Envelope (Outer Fit)"):
        assert (
            client.post(
                "/sdapi/v1/txt2img", json=body(unit(image=b64(picture((48, 40))), resize_mode=mode))
            ).status_code
            == 200
        )


def test_img2img_unit_without_image_uses_the_init_image(client: TestClient) -> None:
    u = unit()
    del u["image"]
    r = client.post("/sdapi/v1/img2img", json=body(u, init_images=[b64(picture())]))
    assert r.status_code == 200, r.text
    assert client.post("/sdapi/v1/txt2img", json=body(u)).status_code == 400  # txt2img has no init image


@pytest.mark.parametrize(
    "changes, status, field",
    [
        ({"model": "depth_net"}, 400, "model"),
        ({"model": None}, 400, "model"),
        ({"image": "###"}, 400, "image"),
        ({"image": "data:image/png,abc"}, 400, "image"),
        ({"image": {"image": "x", "mask": "y"}}, 400, "mask"),
        ({"module": "depth_midas"}, 400, "module"),
        ({"module": "ip-adapter_clip_sd15"}, 400, "module"),
        ({"control_mode": "ControlNet is more important"}, 400, "control_mode"),
        ({"control_mode": "loudest"}, 400, "control_mode"),
        ({"resize_mode": "Stretch"}, 400, "resize_mode"),
        ({"weight": 3}, 400, "weight"),
        ({"weight": True}, 400, "weight"),
        ({"guidance_start": 0.5, "guidance_end": 0.5}, 400, "guidance_start"),
        ({"module": "canny", "threshold_a": 200, "threshold_b": 100}, 400, "threshold_a"),
        ({"enabled": "yes"}, 400, "enabled"),
        ({"model": "x" * 1000}, 400, "model"),
    ],
)
def test_bad_units_are_4xx_naming_the_field(
    client: TestClient, changes: dict, status: int, field: str
) -> None:
    r = client.post("/sdapi/v1/txt2img", json=body(unit(**changes)))
    assert r.status_code == status, r.text
    assert field in r.json()["detail"]
    assert len(r.text) < 2000


def test_unknown_model_lists_the_loaded_ones(client: TestClient) -> None:
    r = client.post("/sdapi/v1/txt2img", json=body(unit(model="control_v11f1p_sd15_depth [cfd03158]")))
    assert r.status_code == 400 and "my_canny_net" in r.json()["detail"]


def test_too_many_units_and_bad_shapes(client: TestClient) -> None:
    assert (
        client.post("/sdapi/v1/txt2img", json=body(unit(), unit())).status_code == 400
    )  # one net, used twice
    assert client.post("/sdapi/v1/txt2img", json=body(*[unit(enabled=False)] * 17)).status_code == 400
    for scripts in ({"controlnet": {"args": "x"}}, {"controlnet": []}, {"controlnet": {"args": [1]}}):
        r = client.post("/sdapi/v1/txt2img", json={**body(), "alwayson_scripts": scripts})
        assert r.status_code == 400 and "alwayson_scripts.controlnet" in r.json()["detail"]
    r = client.post("/sdapi/v1/txt2img", json={**body(), "alwayson_scripts": {"adetailer": {"args": []}}})
    assert r.status_code == 400 and "adetailer" in r.json()["detail"]


def test_large_control_images_are_refused_from_their_header(pipe, net_folder: Path) -> None:
    settings = Settings(**LIMITS, max_input_pixels=40 * 40, controlnets=(("canny", str(net_folder)),))
    with TestClient(create_app(pipe, settings)) as c:
        r = c.post("/sdapi/v1/txt2img", json=body(unit(image=b64(picture((64, 64))))))
        assert r.status_code == 400 and "max_input_pixels" in r.json()["detail"]
    settings = Settings(**LIMITS, max_upload_bytes=100, controlnets=(("canny", str(net_folder)),))
    with TestClient(create_app(pipe, settings)) as c:
        r = c.post("/sdapi/v1/txt2img", json=body(unit()))
        assert r.status_code == 400 and "upload limit" in r.json()["detail"]


def test_warn_policy_runs_without_control_mode(pipe, net_folder: Path) -> None:
    settings = Settings(**LIMITS, unsupported="warn", controlnets=(("canny", str(net_folder)),))
    with TestClient(create_app(pipe, settings)) as c:
        r = c.post("/sdapi/v1/txt2img", json=body(unit(control_mode=2, weight=0.7)))
        assert r.status_code == 200, r.text
        assert any("control_mode" in w for w in r.json()["warnings"])
        np.testing.assert_array_equal(pixels(r.json()), direct(pipe, picture(), 0.7))


def test_extension_routes(client: TestClient) -> None:
    assert client.get("/controlnet/version").json() == {"version": 2}
    assert client.get("/controlnet/model_list").json() == {"model_list": ["my_canny_net"]}
    modules = client.get("/controlnet/module_list").json()
    assert modules["module_list"] == ["none", "canny"] and "canny" in modules["module_detail"]
    r = client.post(
        "/controlnet/detect",
        json={"controlnet_module": "canny", "controlnet_input_images": [b64(picture())]},
    )
    edges = PIL.Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    np.testing.assert_array_equal(np.asarray(edges), np.asarray(canny(picture())))
    assert client.post("/controlnet/detect", json={"controlnet_module": "openpose"}).status_code == 422


def test_without_nets_enabled_units_are_refused_and_disabled_ones_ignored() -> None:
    with TestClient(create_app(FakePipe(), Settings(**LIMITS))) as c:
        assert c.get("/controlnet/model_list").json() == {"model_list": []}
        r = c.post("/sdapi/v1/txt2img", json=body(unit()))
        assert r.status_code == 400 and "no ControlNet loaded" in r.json()["detail"]
        assert c.post("/sdapi/v1/txt2img", json=body(unit(enabled=False))).status_code == 200


def test_control_requests_are_never_batched() -> None:
    unit_ = ControlUnit("canny", picture())
    assert batch_key(GenerationRequest(PROMPT)) is not None
    assert batch_key(GenerationRequest(PROMPT, controls=(unit_,))) is None
    assert batch_key(GenerationRequest(PROMPT, controls=(None,))) is not None
    assert batch_key(GenerationRequest(PROMPT, extra={"ip_adapter_image": picture()})) is None


def test_serve_refuses_a_controlnet_that_does_not_fit_before_listening(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import uvicorn

    def never(*args, **kwargs):
        raise AssertionError("the server started listening")

    monkeypatch.setattr(uvicorn, "run", never)
    misfit = _controlnet(tmp_path / "sdxl_like", block_out_channels=(32, 48), norm_num_groups=8)
    status = cli.main(["serve", "--model", str(tiny_model_dir()), "--controlnet", f"canny={misfit}"])
    err = capsys.readouterr().err
    assert status != 0 and "another base model" in err and len(err.strip().splitlines()) == 1
    status = cli.main(["serve", "--model", str(tiny_model_dir()), "--controlnet", "canny=/no/such/net"])
    assert status == 2 and "no such file" in capsys.readouterr().err
