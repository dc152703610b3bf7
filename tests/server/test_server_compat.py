"""Honest A1111/OpenAI compatibility, through FastAPI's TestClient on the fake pipeline (and the tiny real model
where a LoRA has to be loaded).

Proves that every A1111 or OpenAI setting lcmkit does not implement is refused with a 400 naming it (or, with
`unsupported="warn"`, ignored and listed in `warnings` while info/infotext claim nothing of it); that the ones it
claims are honoured (CLIP_stop_at_last_layers as clip_skip, samples_format, send_images, infotext, resize modes,
output_compression, batch_size x n_iter beyond max_batch with consecutive seeds); that a checkpoint or model other
than the served one is refused; and the new routes png-info, loras, sd-vae and schedulers in A1111's shapes.
"""

from __future__ import annotations

import base64
import io
import json

import PIL.Image
import pytest
from fastapi.testclient import TestClient
from server_fakes import FakePipe, tiny_pipe

from lcmkit import cli
from lcmkit.server import a1111
from lcmkit.server.app import create_app
from lcmkit.server.jobs import Settings

LIMITS = dict(max_width=256, max_height=256, model_name="tiny")


@pytest.fixture
def fake() -> FakePipe:
    return FakePipe()


@pytest.fixture
def client(fake: FakePipe):
    with TestClient(create_app(fake, Settings(**LIMITS))) as c:
        yield c


@pytest.fixture
def lenient(fake: FakePipe):
    with TestClient(create_app(fake, Settings(**LIMITS, unsupported="warn"))) as c:
        yield c


def png_b64(size: tuple[int, int] = (64, 64), text: str | None = None) -> str:
    buf = io.BytesIO()
    info = None
    if text is not None:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("parameters", text)
    PIL.Image.new("RGB", size, (200, 40, 40)).save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def decode(b64: str) -> PIL.Image.Image:
    im = PIL.Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


# ----------------------------------------------------------------------------------------------------------------------
# A1111 fields that change the image


UNHONOURED_TXT2IMG = [
    ({"enable_hr": True, "hr_scale": 2}, "enable_hr"),
    ({"tiling": True}, "tiling"),
    ({"restore_faces": True}, "restore_faces"),
    ({"subseed": 5, "subseed_strength": 0.3}, "subseed_strength"),
    ({"alwayson_scripts": {"ADetailer": {"args": [True]}}}, "alwayson_scripts"),
    ({"script_name": "x/y/z plot", "script_args": [1]}, "script_name"),
    ({"override_settings": {"eta_noise_seed_delta": 31337}}, "override_settings.eta_noise_seed_delta"),
    ({"sampler_name": "Euler a"}, "sampler_name"),
    ({"sampler_index": "DPM++ 2M"}, "sampler_index"),
    ({"scheduler": "Karras"}, "scheduler"),
    ({"styles": ["cinematic"]}, "styles"),
    ({"seed_resize_from_h": 512, "seed_resize_from_w": 512}, "seed_resize_from_h"),
    ({"s_min_uncond": 0.5}, "s_min_uncond"),
    ({"refiner_checkpoint": "sdxl-refiner"}, "refiner_checkpoint"),
    ({"prompt": "a cat <lora:pixel-art:0.8>"}, "prompt"),
    ({"override_settings": {"sd_vae": "vae-ft-mse-840000"}}, "override_settings.sd_vae"),
]


@pytest.mark.parametrize(("extra", "name"), UNHONOURED_TXT2IMG, ids=[n for _, n in UNHONOURED_TXT2IMG])
def test_txt2img_refuses_what_it_does_not_honour(client: TestClient, fake: FakePipe, extra: dict, name: str):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "p", **extra})
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert name in detail and "not supported" in detail and "--unsupported warn" in detail
    assert fake.calls == []  # refused before the worker


@pytest.mark.parametrize(
    ("extra", "name"),
    [
        ({"init_images": [png_b64(), png_b64()]}, "init_images"),
        ({"resize_mode": 3}, "resize_mode"),
        ({"initial_noise_multiplier": 0.9}, "initial_noise_multiplier"),
        ({"tiling": True}, "tiling"),
    ],
)
def test_img2img_refuses_what_it_does_not_honour(client: TestClient, fake: FakePipe, extra: dict, name: str):
    body = {"prompt": "p", "init_images": [png_b64()], **extra}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 400 and name in r.json()["detail"], r.text
    assert fake.calls == []


def test_all_refused_settings_are_named_at_once(client: TestClient) -> None:
    body = {"prompt": "p", "enable_hr": True, "tiling": True, "sampler_name": "Euler a"}
    detail = client.post("/sdapi/v1/txt2img", json=body).json()["detail"]
    assert all(name in detail for name in ("enable_hr=true", "tiling=true", "sampler_name='Euler a'"))


def test_defaults_and_no_effect_fields_are_accepted(client: TestClient, fake: FakePipe) -> None:
    """What A1111 clients send by default: the values that do nothing, and fields that do not change the image."""
    body = {"prompt": "p", "enable_hr": False, "tiling": False, "restore_faces": False, "subseed": 1234,
            "subseed_strength": 0, "alwayson_scripts": {}, "script_name": None, "script_args": [], "styles": [],
            "sampler_name": "LCM", "sampler_index": "Euler", "scheduler": "Automatic", "eta": 0.7, "s_churn": 1,
            "do_not_save_samples": True, "save_images": False, "seed_resize_from_h": -1, "comments": {"a": 1},
            "hr_upscaler": "Latent", "hr_second_pass_steps": 20, "override_settings": {"sd_model_checkpoint": "tiny"},
            "refiner_checkpoint": "None", "disable_extra_networks": True, "an_unknown_field": 1}  # fmt: skip
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert "warnings" not in r.json() and len(fake.calls) == 1


def test_warn_policy_runs_without_them_and_says_so(lenient: TestClient, fake: FakePipe) -> None:
    body = {"prompt": "p", "seed": 3, "enable_hr": True, "restore_faces": True, "sampler_name": "Euler a",
            "override_settings": {"eta_noise_seed_delta": 31337}}  # fmt: skip
    r = lenient.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    warned = " ".join(out["warnings"])
    for name in ("enable_hr", "restore_faces", "sampler_name", "override_settings.eta_noise_seed_delta"):
        assert name in warned
    info = json.loads(out["info"])
    assert info["sampler_name"] == "LCM" and info["restore_faces"] is False  # info claims what was done
    text = info["infotexts"][0]
    assert "Sampler: LCM" in text and "Euler" not in text and "Hires" not in text and "Face" not in text
    assert decode(out["images"][0]).getpixel((0, 0))[0] == 3  # it did generate, with the seed asked for


def test_a_mask_or_another_checkpoint_is_refused_even_when_lenient(lenient: TestClient) -> None:
    r = lenient.post("/sdapi/v1/img2img", json={"prompt": "p", "init_images": [png_b64()], "mask": png_b64()})
    assert r.status_code == 400 and "mask" in r.json()["detail"]
    body = {"prompt": "p", "override_settings": {"sd_model_checkpoint": "v1-5-pruned.safetensors"}}
    r = lenient.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 400
    assert "sd_model_checkpoint" in r.json()["detail"] and "'tiny'" in r.json()["detail"]


def test_the_policy_setting_and_cli_flag_are_checked() -> None:
    with pytest.raises(ValueError, match=r"unsupported must be one of \['refuse', 'warn'\]"):
        Settings(unsupported="ignore")
    args = cli.build_parser().parse_args(["serve", "--unsupported", "warn"])
    assert cli.server_options(args)["unsupported"] == "warn"
    assert cli.server_options(cli.build_parser().parse_args(["serve"]))["unsupported"] == "refuse"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--unsupported", "ignore"])


# ----------------------------------------------------------------------------------------------------------------------
# What is honoured


def test_clip_stop_at_last_layers_is_clip_skip_per_request_and_as_option(client: TestClient, fake: FakePipe):
    body = {"prompt": "p", "seed": 1, "override_settings": {"CLIP_stop_at_last_layers": 2}}
    out = client.post("/sdapi/v1/txt2img", json=body).json()
    assert fake.calls[-1]["clip_skip"] == 1  # A1111's 2 is diffusers' clip_skip=1 (the penultimate layer)
    info = json.loads(out["info"])
    assert info["clip_skip"] == 2 and "Clip skip: 2" in info["infotexts"][0]
    client.post("/sdapi/v1/txt2img", json={"prompt": "p"})
    assert "clip_skip" not in fake.calls[-1]  # a per-request override is not kept
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 3}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 3
    client.post("/sdapi/v1/txt2img", json={"prompt": "p"})
    assert fake.calls[-1]["clip_skip"] == 2  # the server default now
    body["override_settings_restore_afterwards"] = False  # A1111: the override becomes the option
    client.post("/sdapi/v1/txt2img", json=body)
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
    r = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 13})
    assert r.status_code == 400 and "from 1 to 12" in r.json()["detail"]


def test_clip_skip_reaches_the_real_pipeline() -> None:
    """On the tiny real model the penultimate CLIP layer gives another image than the last one, and the same image
    as calling the pipeline with clip_skip=1 directly."""
    import torch

    pipe = tiny_pipe()
    with TestClient(create_app(pipe, Settings(model_name="tiny-lcm"))) as c:

        def image(stop: int) -> bytes:
            body = {
                "prompt": "a cat",
                "seed": 4,
                "steps": 2,
                "override_settings": {"CLIP_stop_at_last_layers": stop},
            }
            return decode(c.post("/sdapi/v1/txt2img", json=body).json()["images"][0]).tobytes()

        last, penultimate = image(1), image(2)
    direct = pipe(
        "a cat",
        num_inference_steps=2,
        guidance_scale=8.5,
        generator=[torch.Generator().manual_seed(4)],
        clip_skip=1,
    ).images[0]
    assert last != penultimate and penultimate == direct.tobytes()


def test_options_refuse_a_checkpoint_they_cannot_switch_to(client: TestClient) -> None:
    r = client.post(
        "/sdapi/v1/options", json={"sd_model_checkpoint": "v1-5-pruned-emaonly.safetensors [6ce0161689]"}
    )
    assert (
        r.status_code == 400
        and "sd_model_checkpoint" in r.json()["detail"]
        and "['tiny']" in r.json()["detail"]
    )
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny", "samples_format": "webp"})
    assert r.status_code == 200 and r.json() is None
    assert client.get("/sdapi/v1/options").json()["samples_format"] == "webp"
    r = client.post("/sdapi/v1/options", json={"show_progressbar": False, "samples_format": "jpg"})
    assert r.status_code == 400 and "show_progressbar" in r.json()["detail"]
    assert (
        client.get("/sdapi/v1/options").json()["samples_format"] == "webp"
    )  # nothing applied from a refusal


def test_options_warn_about_unknown_keys_when_lenient(lenient: TestClient) -> None:
    r = lenient.post("/sdapi/v1/options", json={"show_progressbar": False, "samples_format": "jpg"})
    assert r.status_code == 200 and "show_progressbar" in r.json()["warnings"][0]
    assert lenient.get("/sdapi/v1/options").json()["samples_format"] == "jpg"


def test_samples_format_and_send_images(client: TestClient) -> None:
    out = client.post(
        "/sdapi/v1/txt2img", json={"prompt": "p", "override_settings": {"samples_format": "jpg"}}
    ).json()
    assert decode(out["images"][0]).format == "JPEG"
    out = client.post("/sdapi/v1/txt2img", json={"prompt": "p", "seed": 8, "send_images": False}).json()
    assert out["images"] == [] and json.loads(out["info"])["all_seeds"] == [8]


def test_batch_size_times_n_iter_up_to_the_image_limit_in_max_batch_calls(fake: FakePipe) -> None:
    """max_batch bounds one pipeline call, not the request: batch_size 3 x n_iter 2 = 6 images run as four calls
    of at most 2 images, and image i still has seed + i."""
    settings = Settings(max_batch=2, max_images=6)
    with TestClient(create_app(fake, settings)) as c:
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "p", "seed": 10, "batch_size": 3, "n_iter": 2})
        assert r.status_code == 200, r.text
        out = r.json()
        assert json.loads(out["info"])["all_seeds"] == [10, 11, 12, 13, 14, 15]
        assert [decode(b).getpixel((0, 0))[0] for b in out["images"]] == [10, 11, 12, 13, 14, 15]
        assert [[g.initial_seed() for g in call["generator"]] for call in fake.calls] == [
            [10, 11],
            [12],
            [13, 14],
            [15],
        ]
        r = c.post("/v1/images/generations", json={"prompt": "p", "seed": 20, "n": 5})
        assert [decode(d["b64_json"]).getpixel((0, 0))[0] for d in r.json()["data"]] == [20, 21, 22, 23, 24]
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "p", "batch_size": 4, "n_iter": 2})
        assert r.status_code == 400 and "between 1 and 6, got 8" in r.json()["detail"]


def test_infotext_fills_the_fields_the_request_leaves_out(client: TestClient, fake: FakePipe) -> None:
    text = "a cat\nin a hat\nNegative prompt: dog\nSteps: 3, Sampler: LCM, CFG scale: 5, Seed: 42, Size: 64x128, Clip skip: 2"
    r = client.post("/sdapi/v1/txt2img", json={"infotext": text, "steps": 2})
    assert r.status_code == 200, r.text
    call = fake.calls[-1]
    assert (call["prompt"], call["negative_prompt"]) == ("a cat\nin a hat", "dog")
    assert call["num_inference_steps"] == 2  # given in the request: the infotext does not override it
    assert (call["width"], call["height"], call["guidance_scale"], call["clip_skip"]) == (64, 128, 5.0, 1)
    assert call["generator"][0].initial_seed() == 42
    r = client.post(
        "/sdapi/v1/txt2img", json={"infotext": "x\nSteps: 2, Seed: 1, Face restoration: CodeFormer"}
    )
    assert r.status_code == 400 and "restore_faces" in r.json()["detail"]


def test_resize_modes() -> None:
    """1 crops (scale to cover, centre crop); 2 fills (scale to fit, bands from the stretched edges)."""
    image = PIL.Image.new("RGB", (200, 100), (255, 0, 0))
    image.paste((0, 0, 255), (100, 0, 200, 100))  # left half red, right half blue
    image.paste((0, 255, 0), (0, 90, 200, 100))  # green bottom rows
    crop = a1111.resize(image, 1, 64, 64)
    assert crop.size == (64, 64) and crop.getpixel((2, 10))[0] > 200 and crop.getpixel((61, 10))[2] > 200
    fill = a1111.resize(image, 2, 64, 64)
    plain_fit = image.resize((64, 32), PIL.Image.Resampling.LANCZOS)
    assert fill.size == (64, 64)
    assert fill.getpixel((5, 2))[0] > 200  # the band above repeats the top row (red on the left)
    assert fill.getpixel((5, 62))[1] > 150  # the band below repeats the green bottom row
    assert fill.getpixel((5, 32)) == plain_fit.getpixel((5, 16))  # the middle is the image, scaled to fit
    plain = a1111.resize(image, 0, 64, 64)
    assert plain.getpixel((5, 32))[0] > 200 and plain.getpixel((60, 32))[2] > 200


# ----------------------------------------------------------------------------------------------------------------------
# OpenAI


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"model": "dall-e-3"}, "model", "model 'dall-e-3' is not served here; this server serves ['tiny']"),
        ({"frobnicate": 1}, "frobnicate", "Unrecognized request argument supplied: frobnicate"),
        ({"quality": "hd"}, "quality", "quality='hd'"),
        ({"style": "vivid"}, "style", "style='vivid'"),
        ({"background": "transparent"}, "background", "background='transparent'"),
        ({"partial_images": 2}, "partial_images", "partial_images=2"),
    ],
)
def test_openai_refuses_other_models_unknown_and_unhonoured_fields(
    client: TestClient, fake: FakePipe, body: dict, param: str, message: str
) -> None:
    r = client.post("/v1/images/generations", json={"prompt": "p", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["param"] == param and err["type"] == "invalid_request_error"
    assert fake.calls == []


def test_openai_accepts_the_served_model_and_honoured_values(client: TestClient) -> None:
    body = {"prompt": "p", "model": "tiny", "quality": "auto", "background": "opaque", "moderation": "low",
            "user": "u-1", "output_format": "jpeg", "output_compression": 5}  # fmt: skip
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    low = base64.b64decode(r.json()["data"][0]["b64_json"])
    high = client.post("/v1/images/generations", json={**body, "output_compression": 95}).json()
    assert len(low) < len(base64.b64decode(high["data"][0]["b64_json"]))  # the JPEG quality was applied
    assert "warnings" not in r.json()


def test_openai_warn_policy(lenient: TestClient) -> None:
    r = lenient.post("/v1/images/generations", json={"prompt": "p", "style": "vivid", "frobnicate": 1})
    assert r.status_code == 200 and len(r.json()["data"]) == 1
    assert r.json()["warnings"] == [
        "Unrecognized request argument supplied: frobnicate",
        "style='vivid' (DALL-E 3 styles)",
    ]
    r = lenient.post("/v1/images/generations", json={"prompt": "p", "model": "dall-e-3"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"  # never another model's images


# ----------------------------------------------------------------------------------------------------------------------
# PNG info, LoRAs, VAE, schedulers


A1111_INFOTEXT = (
    "masterpiece, a cat\nwearing a hat\nNegative prompt: blurry, dog\nSteps: 20, Sampler: DPM++ 2M, "
    "Schedule type: Karras, CFG scale: 7, Seed: 3301234, Size: 512x768, Model hash: 6ce0161689, Model: v1-5, "
    'Lora hashes: "pixel: 1a2b3c, ink, style: 4d5e6f", Version: v1.10.1'
)


def test_png_info_parses_a1111_and_lcmkit_infotexts(client: TestClient) -> None:
    r = client.post("/sdapi/v1/png-info", json={"image": png_b64(text=A1111_INFOTEXT)})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["info"] == A1111_INFOTEXT and out["items"] == {}
    p = out["parameters"]
    assert p["Prompt"] == "masterpiece, a cat\nwearing a hat" and p["Negative prompt"] == "blurry, dog"
    assert (p["Steps"], p["Sampler"], p["Schedule type"], p["CFG scale"], p["Seed"]) == (
        "20", "DPM++ 2M", "Karras", "7", "3301234",
    )  # fmt: skip
    assert (p["Size-1"], p["Size-2"], p["Model"]) == ("512", "768", "v1-5")
    assert p["Lora hashes"] == "pixel: 1a2b3c, ink, style: 4d5e6f"  # quoted: its commas do not split it
    # an image lcmkit made: its infotext comes back, parsed
    made = client.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "a fox", "negative_prompt": "rain", "seed": 9, "steps": 3, "width": 64, "height": 64},
    )
    image = made.json()["images"][0]
    out = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + image}).json()
    assert out["parameters"]["Prompt"] == "a fox" and out["parameters"]["Negative prompt"] == "rain"
    assert (out["parameters"]["Seed"], out["parameters"]["Steps"], out["parameters"]["Sampler"]) == (
        "9",
        "3",
        "LCM",
    )
    # and sending it back as `infotext` makes the same image
    again = client.post("/sdapi/v1/txt2img", json={"infotext": out["info"]}).json()
    assert again["images"] == [image]


def test_png_info_reads_jpeg_exif_and_refuses_non_images(client: TestClient) -> None:
    exif = PIL.Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + "a cat\nSteps: 4, Seed: 1, Size: 64x64".encode("utf-16-be")
    buf = io.BytesIO()
    PIL.Image.new("RGB", (64, 64)).save(buf, format="JPEG", exif=exif)
    out = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(buf.getvalue()).decode()}).json()
    assert out["info"].startswith("a cat") and out["parameters"]["Seed"] == "1"
    assert client.post("/sdapi/v1/png-info", json={"image": ""}).json() == {
        "info": "",
        "items": {},
        "parameters": {},
    }
    r = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(b"not an image").decode()})
    assert r.status_code == 400 and "image" in r.json()["detail"]


def test_loras_sd_vae_and_schedulers(client: TestClient, tmp_path) -> None:
    assert client.get("/sdapi/v1/loras").json() == []
    assert client.get("/sdapi/v1/sd-vae").json() == []
    assert client.get("/sdapi/v1/schedulers").json() == [
        {
            "name": "automatic",
            "label": "Automatic",
            "aliases": None,
            "default_rho": -1.0,
            "need_inner_model": False,
        }
    ]
    with TestClient(create_app(FakePipe(), Settings(vae_name=str(tmp_path / "taesd")))) as c:
        assert c.get("/sdapi/v1/sd-vae").json() == [
            {"model_name": "taesd", "filename": str(tmp_path / "taesd")}
        ]
        assert c.get("/sdapi/v1/options").json()["sd_vae"] == "taesd"
        body = {"prompt": "p", "override_settings": {"sd_vae": "taesd"}}
        assert c.post("/sdapi/v1/txt2img", json=body).status_code == 200


def test_loras_lists_what_the_served_pipeline_loaded(tmp_path) -> None:
    import torch
    from safetensors.torch import save_file

    pipe = tiny_pipe()
    name, layer = next((n, m) for n, m in pipe.unet.named_modules() if n.endswith("attn1.to_q"))
    key = "lora_unet_" + name.replace(".", "_")
    state = {
        f"{key}.lora_down.weight": torch.randn(2, layer.in_features) * 0.01,
        f"{key}.lora_up.weight": torch.randn(layer.out_features, 2) * 0.01,
        f"{key}.alpha": torch.tensor(2.0),
    }
    path = tmp_path / "pixel-art.safetensors"
    save_file(state, path, {"ss_output_name": "pixel_v2", "ss_tag_frequency": '{"art": {"pixel": 3}}'})
    pipe.load_lora_weights(str(path), adapter_name="lora0")
    with TestClient(create_app(pipe, Settings())) as c:
        loras = c.get("/sdapi/v1/loras").json()
    assert loras == [
        {
            "name": "pixel-art",
            "alias": "lora0",
            "path": str(path),
            "metadata": {"ss_output_name": "pixel_v2", "ss_tag_frequency": {"art": {"pixel": 3}}},
        }
    ]
    pipe.delete_adapters("lora0")
    assert pipe.lora_files == {}
