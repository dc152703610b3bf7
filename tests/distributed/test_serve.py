"""`serve_app` / `lcmkit serve --ray` on a local two-CPU Ray cluster with two replicas of the shipped tiny model.

What these tests prove: the Ray Serve deployment answers the routes of `lcmkit serve` (same OpenAPI paths), the
API key is required, a served image is the `lcmkit generate` image of its seed (four requests at once on two
replicas), and a wrong option fails before anything starts.
"""

from __future__ import annotations

import base64
import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import PIL.Image
import pytest
import ray
from ray import serve

from lcmkit.distributed import serve_app
from lcmkit.request import GenerationRequest, run_request
from lcmkit.server.app import create_app
from lcmkit.spec import ModelSpec, load_pipeline

KEY = {"Authorization": "Bearer k"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(serve_app(ModelSpec(), api_key="k", replicas=2, threads=1, queue_size=8), name="lcmkit")
    base = f"http://127.0.0.1:{port}"
    for _ in range(120):  # each replica loads the model in its worker thread
        if httpx.get(f"{base}/health", timeout=10).status_code == 200:
            break
    yield base
    serve.shutdown()
    ray.shutdown()


def test_same_routes_as_lcmkit_serve(url: str) -> None:
    theirs = create_app(object()).openapi()["paths"]
    assert set(httpx.get(f"{url}/openapi.json", headers=KEY, timeout=30).json()["paths"]) == set(theirs)


def test_key_is_required(url: str) -> None:
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "a cat"}, timeout=30)
    assert r.status_code == 401


def test_images_are_the_generate_images(url: str) -> None:
    def post(seed: int) -> np.ndarray:
        body = {
            "prompt": "a red circle",
            "seed": seed,
            "steps": 4,
            "cfg_scale": 8.5,
            "width": 64,
            "height": 64,
        }
        r = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, headers=KEY, timeout=120)
        assert r.status_code == 200, r.text
        return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))

    with ThreadPoolExecutor(4) as pool:
        served = list(pool.map(post, [1, 2, 3, 4]))
    pipe, name = load_pipeline(ModelSpec())
    pipe.set_progress_bar_config(disable=True)
    for seed, image in zip([1, 2, 3, 4], served, strict=True):
        (mine,) = run_request(pipe, GenerationRequest(prompt="a red circle", seed=seed), model_name=name)
        assert np.array_equal(np.asarray(mine.image), image)


def test_bad_option_fails_before_starting() -> None:
    with pytest.raises(ValueError, match="replicas"):
        serve_app(ModelSpec(), replicas=0)
    with pytest.raises(ValueError, match="unknown server limits"):
        serve_app(ModelSpec(), max_stepz=3)


def test_a_killed_replica_loses_no_accepted_request(url: str) -> None:
    body = {"prompt": "slow", "seed": 1, "steps": 50, "width": 128, "height": 128}

    def post(_: int) -> int:
        r = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, headers=KEY, timeout=300)
        return r.status_code if r.status_code == 200 else (r.status_code, r.text[:300])

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "lcmkit-model" in a["name"]]
    assert len(replicas) == 2
    with ThreadPoolExecutor(6) as pool:
        codes = pool.map(post, range(6))
        time.sleep(2)  # the requests are accepted and running on both replicas
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=False)
        assert list(codes) == [200] * 6
