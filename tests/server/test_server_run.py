"""`lcmkit.server.serve` (server/run.py): the CLI's ModelSpec, checked before listening, loaded in the worker.

uvicorn.run is replaced by a recorder, and the app it was handed runs under FastAPI's TestClient. What these tests
prove: a bad spec or limit raises before uvicorn starts; the model loads in the worker while /health says
"loading"; the server takes every model option the CLI does (LoRAs with weights, FreeU, tiny VAE, OpenVINO) and,
for the same options and seed, serves the very image `lcmkit generate` writes, under the same model name; the
worker's seeds come from `resolve_seeds`, all within A1111's range.
"""

from __future__ import annotations

import base64
import io
import json
import random
import threading
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file
from server_fakes import FakePipe, tiny_model_dir
from torch import nn

import lcmkit.server
import lcmkit.server.run
from lcmkit import cli
from lcmkit.request import MAX_SEED
from lcmkit.server.app import create_app
from lcmkit.server.jobs import Settings
from lcmkit.spec import ModelSpec, SpecError


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> dict:
    """What `serve` handed uvicorn.run (the app and its keyword arguments), instead of listening."""
    import uvicorn

    seen: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    return seen


def png(b64: str) -> PIL.Image.Image:
    im = PIL.Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def test_serve_is_exported_lazily_from_the_package() -> None:
    assert lcmkit.server.serve is lcmkit.server.run.serve


def test_serve_loads_in_the_worker_reads_the_env_key_and_applies_limits(ran, monkeypatch) -> None:
    """`serve` checks, then hands uvicorn an app on 127.0.0.1 with the hardening options; the model is not loaded
    yet (the worker loads it once the app starts), and the served name is the folder's, as in the CLI."""
    from lcmkit.server.app import uvicorn_options

    monkeypatch.setenv("LCMKIT_API_KEY", "from-env")
    lcmkit.server.serve(str(tiny_model_dir()), port=7999, max_steps=3)
    assert (ran["host"], ran["port"]) == ("127.0.0.1", 7999)
    settings = ran["app"].state.settings
    assert (settings.api_key, settings.max_steps, settings.model_name) == ("from-env", 3, "tiny-lcm")
    assert all(ran[k] == v for k, v in uvicorn_options(settings).items() if k != "http")
    assert ran["app"].state.jobs.pipe is None  # not loaded before listening
    with TestClient(ran["app"]) as c:
        assert c.post("/sdapi/v1/txt2img", json={"prompt": "p"}).status_code == 401
        ok = c.post("/sdapi/v1/txt2img", json={"prompt": "p", "steps": 2}, headers={"X-API-Key": "from-env"})
        assert ok.status_code == 200 and json.loads(ok.json()["info"])["width"] == 32  # the model's own size
        assert c.get("/health").json()["status"] == "ok"


def test_health_answers_while_the_model_loads(ran, monkeypatch) -> None:
    """The worker loads the spec: meanwhile /health answers 503 "loading" and a request waits; then it runs."""
    release, loading = threading.Event(), threading.Event()
    specs = []

    def slow_load(spec: ModelSpec):
        specs.append(spec)
        loading.set()
        assert release.wait(10), "test never released the load"
        return FakePipe(), spec.model_name

    monkeypatch.setattr(lcmkit.server.run, "load_pipeline", slow_load)
    lcmkit.server.serve(ModelSpec(model=str(tiny_model_dir()), vae_tiling=True))
    with TestClient(ran["app"]) as c:
        assert loading.wait(10)
        health = c.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        release.set()
        assert c.post("/sdapi/v1/txt2img", json={"prompt": "p", "seed": 3}).status_code == 200
        assert c.get("/health").json()["status"] == "ok"
    assert specs == [ModelSpec(model=str(tiny_model_dir()), vae_tiling=True)]


BAD = [
    ({"model": "/no/such/model"}, SpecError, "--model /no/such/model: no such folder or file"),
    (
        {"model": None, "openvino": "fp32", "freeu": (1, 1, 1, 1)},
        SpecError,
        "cannot be combined with --openvino",
    ),
    ({"model": None, "openvino": "int8"}, SpecError, "allowed: fp32, int8-weights"),
    ({"model": None, "device": "cuda:99"}, SpecError, "--device cuda:99"),
    ({"model": None, "max_widht": 512}, ValueError, "unknown server limits \\['max_widht'\\]"),
    ({"model": None, "max_steps": 0}, ValueError, "server setting max_steps must be"),
    ({"model": ModelSpec(), "tiny_vae": "x"}, ValueError, "inside the ModelSpec"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD, ids=[str(k) for k, _, _ in BAD])
def test_a_bad_spec_or_limit_fails_before_listening(kwargs, error, message, ran) -> None:
    with pytest.raises(error, match=message):
        lcmkit.server.serve(**kwargs)
    assert not ran, "uvicorn was started"


def kohya_lora(unet: nn.Module, path: Path) -> Path:
    g = torch.Generator().manual_seed(5)
    sd = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(("to_k", "to_v")):
            key = "lora_unet_" + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"] = torch.randn(2, module.in_features, generator=g) * 0.5
            sd[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 2, generator=g) * 0.5
    save_file(sd, str(path))
    return path


def test_the_server_serves_what_the_cli_writes(ran, tmp_path, capsys) -> None:
    """Same model options (a LoRA at 0.6, FreeU, VAE tiling), same seed: `lcmkit serve` answers with the pixels
    `lcmkit generate` writes, and both name the model the same way (infotext, /sdapi/v1/options, /v1/models)."""
    from lcmkit import LatentConsistencyModelPipeline

    lora = kohya_lora(
        LatentConsistencyModelPipeline.from_pretrained(tiny_model_dir()).unet, tmp_path / "l.safetensors"
    )
    options = ["--model", str(tiny_model_dir()), "--lora", f"{lora}:0.6", "--freeu", "--vae-tiling"]
    argv = [
        "generate",
        "a red circle",
        *options,
        "--seed",
        "11",
        "--steps",
        "2",
        "--out",
        str(tmp_path),
        "--quiet",
    ]
    assert cli.main(argv) == 0
    path = capsys.readouterr().out.split("\t")[0]
    with PIL.Image.open(path) as im:
        written, written_info = np.asarray(im.convert("RGB")), im.text["parameters"]

    spec = cli.model_spec(cli.build_parser().parse_args(["serve", *options]))
    lcmkit.server.serve(spec)
    with TestClient(ran["app"]) as c:
        body = {"prompt": "a red circle", "seed": 11, "steps": 2, "cfg_scale": 8.5}
        r = c.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        served = png(r.json()["images"][0])
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-lcm"
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny-lcm"]
    assert np.array_equal(np.asarray(served.convert("RGB")), written)
    assert "Model: tiny-lcm" in written_info and "Model: tiny-lcm" in served.info["parameters"]
    assert "Seed: 11," in served.info["parameters"]


def test_serve_with_openvino_runs_the_unet_through_it(ran, monkeypatch, tmp_path) -> None:
    """`lcmkit serve --openvino fp32`: the worker's pipeline has the per-size OpenVINO UNet and VAE decoder, and
    serves through both."""
    pytest.importorskip("openvino")
    from lcmkit.accel import OpenVINOUNetPerShape, OpenVINOVAEDecoder

    monkeypatch.setenv("LCMKIT_OPENVINO_CACHE", str(tmp_path))
    lcmkit.server.serve(str(tiny_model_dir()), openvino="fp32", device="cpu")
    with TestClient(ran["app"]) as c:
        ok = c.post("/sdapi/v1/txt2img", json={"prompt": "p", "steps": 2})
        assert ok.status_code == 200
    pipe = ran["app"].state.jobs.pipe
    assert isinstance(pipe.unet, OpenVINOUNetPerShape) and isinstance(pipe.vae.decoder, OpenVINOVAEDecoder)
    assert pipe.unet.compiled_shapes and pipe.vae.decoder.compiled_shapes  # the request ran through both


def test_worker_seeds_stay_within_range(monkeypatch) -> None:
    """Random seeds for batch_size x n_iter images are one consecutive run that ends at MAX_SEED at the latest,
    even when the random start is the largest one allowed."""
    monkeypatch.setattr(random, "randint", lambda low, high: high)
    with TestClient(create_app(FakePipe(), Settings())) as c:
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "p", "batch_size": 2, "n_iter": 2, "seed": -1})
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
    assert info["all_seeds"] == [MAX_SEED - 3, MAX_SEED - 2, MAX_SEED - 1, MAX_SEED]
