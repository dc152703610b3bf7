"""Every server route through FastAPI's TestClient, on a fake pipeline (no model, no sleeps).

Proves the HTTP <-> GenerationRequest translation (sizes, seeds, batches, iterations), the exact reply shapes of
the OpenAI images API and the AUTOMATIC1111 API, the infotext in the PNGs, the API key rules and the probe routes.
"""

from __future__ import annotations

import base64
import io
import json

import PIL.Image
import pytest
from fastapi.testclient import TestClient
from server_fakes import FakePipe

from lcmkit.server.app import create_app
from lcmkit.server.jobs import Settings

KEY = "s3cret-key"


@pytest.fixture
def fake() -> FakePipe:
    return FakePipe()


@pytest.fixture
def client(fake: FakePipe):
    with TestClient(create_app(fake, Settings(max_width=256, max_height=256, model_name="tiny"))) as c:
        yield c


@pytest.fixture
def keyed(fake: FakePipe):
    with TestClient(create_app(fake, Settings(api_key=KEY))) as c:
        yield c


def png(b64: str) -> PIL.Image.Image:
    im = PIL.Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def test_openai_generation_shape_sizes_and_seeds(client: TestClient, fake: FakePipe) -> None:
    body = {"model": "tiny", "prompt": "a cat", "n": 2, "size": "64x128", "response_format": "b64_json",
            "seed": 7, "steps": 3, "guidance_scale": 5.0, "negative_prompt": "dog", "quality": "auto"}  # fmt: skip
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"created", "data"} and isinstance(out["created"], int)
    assert [set(d) for d in out["data"]] == [{"b64_json"}, {"b64_json"}]
    images = [png(d["b64_json"]) for d in out["data"]]
    assert [im.size for im in images] == [(64, 128), (64, 128)]
    assert [im.getpixel((0, 0))[0] for im in images] == [7, 8]  # seed + i, as A1111 and our CLI do
    assert images[1].info["parameters"].startswith("a cat\nNegative prompt: dog\nSteps: 3,")
    assert "Seed: 8" in images[1].info["parameters"] and "Model: tiny" in images[1].info["parameters"]
    call = fake.calls[0]
    assert (call["width"], call["height"], call["num_inference_steps"], call["num_images_per_prompt"]) == (
        64,
        128,
        3,
        2,
    )
    assert call["guidance_scale"] == 5.0 and call["negative_prompt"] == "dog"


def test_openai_defaults_random_seed_and_auto_size(client: TestClient, fake: FakePipe) -> None:
    r = client.post("/v1/images/generations", json={"prompt": "x", "size": "auto"})
    assert r.status_code == 200
    assert len(r.json()["data"]) == 1
    assert fake.calls[0]["width"] is None and fake.calls[0]["num_inference_steps"] == 4
    r = client.post("/v1/images/generations", json={"prompt": "x", "output_format": "jpeg"})
    assert png(r.json()["data"][0]["b64_json"]).format == "JPEG"


def test_txt2img_batches_iterations_info_and_parameters(client: TestClient, fake: FakePipe) -> None:
    body = {"prompt": "p", "negative_prompt": "n", "steps": 2, "cfg_scale": 3.5, "seed": 5, "width": 64,
            "height": 64, "batch_size": 2, "n_iter": 2, "sampler_name": "LCM", "restore_faces": False}  # fmt: skip
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"images", "parameters", "info"} and isinstance(out["info"], str)
    info = json.loads(out["info"])
    assert info["seed"] == 5 and info["all_seeds"] == [5, 6, 7, 8]
    assert len(info["infotexts"]) == 4 and "Seed: 7" in info["infotexts"][2]
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (64, 64, 2, 3.5)
    assert info["sd_model_name"] == "tiny" and info["all_prompts"] == ["p"] * 4
    assert [png(b).getpixel((0, 0))[0] for b in out["images"]] == [5, 6, 7, 8]
    assert out["parameters"]["prompt"] == "p" and out["parameters"]["batch_size"] == 2
    # n_iter runs batches one after another, seeds continuing across them
    assert [c["num_images_per_prompt"] for c in fake.calls] == [2, 2]
    assert [[g.initial_seed() for g in c["generator"]] for c in fake.calls] == [[5, 6], [7, 8]]


def test_txt2img_random_seed_is_reported(client: TestClient) -> None:
    out = client.post("/sdapi/v1/txt2img", json={"prompt": "p", "seed": -1, "batch_size": 3}).json()
    seeds = json.loads(out["info"])["all_seeds"]
    assert seeds == [seeds[0], seeds[0] + 1, seeds[0] + 2] and seeds[0] >= 0
    assert [png(b).getpixel((0, 0))[0] for b in out["images"]] == [s % 256 for s in seeds]


def test_pipeline_errors_map_to_400_and_500(client: TestClient) -> None:
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "raise value error"})
    assert r.status_code == 400 and "refused" in r.json()["detail"]
    r = client.post("/v1/images/generations", json={"prompt": "raise runtime error"})
    assert r.status_code == 500 and "out of memory" in r.json()["error"]["message"]
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "fine"}).status_code == 200  # the worker survived


def test_progress_when_idle_and_after_a_job(client: TestClient) -> None:
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["current_image"] is None and idle["eta_relative"] == 0
    assert {"job_count", "sampling_step", "sampling_steps"} <= set(idle["state"])
    client.post("/sdapi/v1/txt2img", json={"prompt": "p", "steps": 3, "force_task_id": "task(abc)"})
    done = client.get("/sdapi/v1/progress", params={"id_task": "task(abc)"}).json()
    assert done["completed"] and done["progress"] == 1.0
    assert (done["state"]["sampling_step"], done["state"]["sampling_steps"]) == (3, 3)
    unknown = client.get("/sdapi/v1/progress", params={"id_task": "nope"}).json()
    assert unknown["progress"] == 0 and not unknown["completed"]


def test_probe_routes_health_docs_and_page(client: TestClient) -> None:
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["limits"]["max_width"] == 256 and "api_key" not in health.json()["limits"]
    assert client.get("/sdapi/v1/sd-models").json()[0]["model_name"] == "tiny"
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"}).status_code == 200
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other"}).status_code == 400
    assert client.get("/sdapi/v1/samplers").json()[0]["name"] == "LCM"
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/images/generations", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/progress"} <= set(
        paths
    )
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/app.js" in page.text
    for text in (page.text, client.get("/static/app.js").text, client.get("/static/style.css").text):
        assert "http://" not in text and "https://" not in text  # nothing from a CDN: the page works offline


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}, {"Authorization": f"Basic {KEY}"}],
    ids=["none", "wrong-bearer", "wrong-x-api-key", "not-bearer"],
)
def test_api_key_rejects(keyed: TestClient, headers: dict) -> None:
    r = keyed.post("/sdapi/v1/txt2img", json={"prompt": "p"}, headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "API key" in r.json()["detail"]
    r = keyed.post("/v1/images/generations", json={"prompt": "p"}, headers=headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    for path in ("/sdapi/v1/progress", "/sdapi/v1/sd-models", "/sdapi/v1/options", "/v1/models"):
        assert keyed.get(path, headers=headers).status_code == 401, path


def test_api_key_accepts_bearer_and_x_api_key_and_leaves_health_and_page_open(keyed: TestClient) -> None:
    for headers in (
        {"Authorization": f"Bearer {KEY}"},
        {"X-API-Key": KEY},
        {"authorization": f"bearer {KEY}"},
    ):
        assert keyed.post("/sdapi/v1/txt2img", json={"prompt": "p"}, headers=headers).status_code == 200
    assert keyed.get("/health").json()["auth"] is True
    assert keyed.get("/").status_code == 200 and keyed.get("/static/app.js").status_code == 200


def test_factory_loads_in_worker_and_load_failure_is_reported() -> None:
    with TestClient(create_app(lambda: FakePipe())) as c:
        assert c.post("/sdapi/v1/txt2img", json={"prompt": "p"}).status_code == 200
        assert c.get("/health").json()["status"] == "ok"

    def broken() -> FakePipe:
        raise OSError("no such model folder")

    with TestClient(create_app(broken)) as c:
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "p"})
        assert r.status_code == 500 and "failed to load" in r.json()["detail"]
        health = c.get("/health")
        assert health.status_code == 503 and "no such model folder" in health.json()["error"]


@pytest.mark.parametrize(
    ("field", "value"), [("queue_size", 0), ("max_steps", -1), ("min_size", 60), ("max_width", 100)]
)
def test_bad_settings_are_refused(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"server setting {field} must be"):
        Settings(**{field: value})
