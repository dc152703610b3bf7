"""Every 4xx the server answers, and the 503 of a full queue, on a fake pipeline.

Proves that bad input is refused before it reaches the worker, with a message naming the limit and the allowed
range, in each dialect's error shape; and that a full queue answers 503 with Retry-After while progress reports
the running job's step. The worker is held mid-job by an event, never by sleeping.
"""

from __future__ import annotations

import base64
import io
import threading

import PIL.Image
import pytest
from fastapi.testclient import TestClient
from server_fakes import FakePipe

from lcmkit.request import GenerationRequest
from lcmkit.server.app import create_app
from lcmkit.server.jobs import Settings

LIMITS = Settings(max_width=256, max_height=192, max_images=4, max_batch=2, max_steps=8, queue_size=1)


@pytest.fixture
def fake() -> FakePipe:
    return FakePipe()


@pytest.fixture
def client(fake: FakePipe):
    with TestClient(create_app(fake, LIMITS)) as c:
        yield c


def png_b64(size: tuple[int, int] = (64, 64)) -> str:
    buf = io.BytesIO()
    PIL.Image.new("RGB", size, (10, 20, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": "x", "size": "100x64"}, "width must be a multiple of 8 between 64 and 256, got 100"),
        ({"prompt": "x", "size": "64x200"}, "height must be a multiple of 8 between 64 and 192, got 200"),
        ({"prompt": "x", "size": "512x64"}, "width must be a multiple of 8 between 64 and 256, got 512"),
        ({"prompt": "x", "size": "32x64"}, "width must be a multiple of 8 between 64 and 256, got 32"),
        ({"prompt": "x", "size": "big"}, 'size must look like "512x512"'),
        ({"prompt": "x", "n": 5}, "n must be between 1 and 4, got 5"),  # max_images (n > max_batch is split)
        ({"prompt": "x", "n": 0}, "n must be between 1 and 4, got 0"),
        ({"prompt": "x", "steps": 9}, "steps must be between 1 and 8, got 9"),
        ({"prompt": "x", "steps": 0}, "steps must be between 1 and 8, got 0"),
        ({"prompt": "x", "seed": 2**32 - 1, "n": 2}, "seed must be between -1 and 4294967294"),
        ({"prompt": "x", "response_format": "url"}, "only 'b64_json' is, since this server does not host"),
        ({"prompt": "x", "stream": True}, "stream=true is not supported"),
        ({"prompt": "x", "output_format": "gif"}, "output_format must be one of"),
        ({"size": "64x64"}, "prompt: Field required"),
        ({"prompt": "x", "n": "many"}, "n: Input should be a valid integer"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_openai_400s(client: TestClient, fake: FakePipe, body: dict, message: str) -> None:
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error"
    assert fake.calls == []  # refused before the worker
    if "prompt" not in body:
        assert err["param"] == "prompt"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"width": 70, "height": 64}, "width must be a multiple of 8 between 64 and 256, got 70"),
        ({"batch_size": 5}, "batch_size must be between 1 and 4, got 5"),  # max_images; max_batch is per call
        ({"batch_size": 2, "n_iter": 3}, "images per request must be between 1 and 4, got 6"),
        ({"n_iter": 0}, "n_iter must be at least 1, got 0"),
        ({"steps": 50}, "steps must be between 1 and 8, got 50"),
    ],
)
def test_txt2img_limits_are_400(client: TestClient, fake: FakePipe, body: dict, message: str) -> None:
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", **body})
    assert r.status_code == 400 and message in r.json()["detail"]
    assert fake.calls == []


def test_txt2img_type_errors_are_422_as_in_a1111(client: TestClient) -> None:
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": "lots"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "steps"]


@pytest.mark.parametrize(
    ("images", "extra", "message"),
    [
        (["not base64 !!!"], {}, "init_images[0] is not valid base64"),
        ([base64.b64encode(b"plain text, not an image").decode()], {}, "not an image PIL can read"),
        (["data:image/png,rawbytes"], {}, "data: URL that is not base64"),
        ([], {}, "img2img needs one image in init_images"),
        ([png_b64()], {"mask": png_b64()}, "inpainting (mask) is not supported"),
        ([png_b64()], {"denoising_strength": 0}, "denoising strength must be in (0, 1], got 0"),
        (
            [png_b64((300, 64))],
            {},
            "the init image is 300x64: width must be a multiple of 8 between 64 and 256",
        ),
        (
            [png_b64()],
            {"width": 64, "height": 600},
            "height must be a multiple of 8 between 64 and 192, got 600",
        ),
    ],
)
def test_img2img_400s(client: TestClient, images: list, extra: dict, message: str) -> None:
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": images, **extra})
    assert r.status_code == 400, r.text
    assert message in r.json()["detail"]


def test_img2img_without_init_images_is_422(client: TestClient) -> None:
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "init_images"]


def test_upload_limit_is_400() -> None:
    with TestClient(create_app(FakePipe(), Settings(max_upload_bytes=100))) as c:
        r = c.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [png_b64((256, 256))]})
        assert r.status_code == 400 and "upload limit of 100 bytes" in r.json()["detail"]


def test_full_queue_is_503_with_retry_after_and_progress_tracks_the_running_job() -> None:
    gate = threading.Event()
    fake = FakePipe(gate=gate)
    app = create_app(fake, LIMITS)  # queue_size=1: one job running plus one waiting fills it
    with TestClient(app) as client:
        first: dict = {}
        body = {"prompt": "first", "steps": 4, "force_task_id": "task(first)"}
        runner = threading.Thread(target=lambda: first.update(r=client.post("/sdapi/v1/txt2img", json=body)))
        runner.start()
        try:
            assert fake.started.wait(10), "the worker never started the first job"
            waiting = app.state.jobs.submit(GenerationRequest("second", steps=2))
            r = client.post("/v1/images/generations", json={"prompt": "third"})
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert "queue full" in r.json()["error"]["message"]
            r = client.post("/sdapi/v1/txt2img", json={"prompt": "third"})
            assert r.status_code == 503 and "retry-after" in r.headers

            now = client.get("/sdapi/v1/progress").json()  # no id: the running job
            assert now["progress"] == 0.25 and now["state"]["job_count"] == 2
            assert (now["state"]["sampling_step"], now["state"]["sampling_steps"]) == (1, 4)
            mine = client.get("/sdapi/v1/progress", params={"id_task": "task(first)"}).json()
            assert mine["active"] and not mine["queued"] and mine["current_task"] == "task(first)"
            queued = client.get("/sdapi/v1/progress", params={"id_task": waiting.id}).json()
            assert queued["queued"] and queued["queue_position"] == 1 and queued["progress"] == 0
            assert client.get("/health").json()["queue"] == {"waiting": 1, "capacity": 1}
        finally:
            gate.set()
            runner.join(10)
        assert first["r"].status_code == 200
        assert len(waiting.future.result(10)) == 1
        assert client.post("/sdapi/v1/txt2img", json={"prompt": "again"}).status_code == 200
