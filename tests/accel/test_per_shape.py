"""`use_openvino_unet` / `OpenVINOUNetPerShape`: the OpenVINO UNet for any image size, as the CLI and server use it.

What these tests prove: images of two sizes (text-to-image and image-to-image) match the eager pipeline within
1e-3, each size is converted once and read back from the cache by a new process's worth of objects, and the
precisions that need calibration, non-CPU pipelines and FreeU are refused with a message that says why.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from lcmkit import LatentConsistencyModelImg2ImgPipeline, LatentConsistencyModelPipeline
from lcmkit.accel import OpenVINOUNetPerShape, graphs, use_openvino_unet
from lcmkit.accel.per_shape import CACHE_ENV, DATA_FREE_PRECISIONS, default_cache_dir
from lcmkit.cli import OPENVINO_PRECISIONS
from lcmkit.tiny import build_tiny_lcm

pytest.importorskip("openvino", reason="the OpenVINO fast mode is an optional extra (lcmkit[openvino])")

PROMPT = "a red circle on a blue background"
IMAGE_TOL = 1e-3


def _pipe(folder) -> LatentConsistencyModelPipeline:
    pipe = LatentConsistencyModelPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _t2i(pipe, size: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        PROMPT, height=size, width=size, num_inference_steps=2, generator=generator, output_type="np"
    ).images


def _i2i(pipe) -> np.ndarray:
    runner = LatentConsistencyModelImg2ImgPipeline.from_pipe(pipe)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8))
    generator = torch.Generator().manual_seed(0)
    return runner(
        PROMPT, image=image, strength=0.6, num_inference_steps=4, generator=generator, output_type="np"
    ).images


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_lcm(tmp_path_factory.mktemp("tiny") / "m")


def _no_conversion(*args, **kwargs):
    raise AssertionError("converted again instead of reading the cache")


def test_every_size_matches_eager_and_converts_once(folder, tmp_path, monkeypatch):
    eager = _pipe(folder)
    expected = {size: _t2i(eager, size) for size in (32, 48)}
    expected_i2i = _i2i(eager)

    fast = _pipe(folder)
    unet = use_openvino_unet(fast, "fp32", cache_dir=tmp_path, threads=1)
    assert fast.unet is unet and isinstance(unet, OpenVINOUNetPerShape)
    for size in (32, 48, 32):
        got = _t2i(fast, size)
        assert got.shape == expected[size].shape
        assert np.abs(got - expected[size]).max() <= IMAGE_TOL
    got = _i2i(fast)
    assert np.abs(got - expected_i2i).max() <= IMAGE_TOL
    f, tokens = fast.vae_scale_factor, fast.tokenizer.model_max_length
    assert unet.compiled_shapes == sorted((h // f, w // f, tokens) for h, w in ((32, 32), (48, 48), (24, 40)))

    # a fresh stand-in (as in a new process) reads every graph back from the cache
    monkeypatch.setattr(graphs, "convert", _no_conversion)
    again = _pipe(folder)
    use_openvino_unet(again, "fp32", cache_dir=tmp_path, threads=1)
    assert np.abs(_t2i(again, 48) - expected[48]).max() <= IMAGE_TOL


def test_int8_weights_runs_near_eager(folder, tmp_path):
    eager = _t2i(_pipe(folder), 32)
    fast = _pipe(folder)
    use_openvino_unet(fast, "int8-weights", cache_dir=tmp_path, threads=1)
    got = _t2i(fast, 32)
    assert got.shape == eager.shape and np.isfinite(got).all()
    assert np.abs(got - eager).mean() < 0.05  # tiny random weights: the wiring, not image quality


def test_refusals_say_why(folder, tmp_path):
    pipe = _pipe(folder)
    for precision in ("int8", "int8-hybrid"):
        with pytest.raises(ValueError, match="calibration"):
            use_openvino_unet(pipe, precision, cache_dir=tmp_path)
    # the CLI's --openvino choices, named there without importing torch ("fp16-weights" is the fast mode's)
    assert tuple(p for p in DATA_FREE_PRECISIONS if p != "fp16-weights") == OPENVINO_PRECISIONS
    with pytest.raises(ValueError, match="float32 on the CPU"):
        use_openvino_unet(_pipe(folder).to(torch.float16), cache_dir=tmp_path)
    pipe.enable_freeu(0.9, 0.2, 1.5, 1.6)
    with pytest.raises(ValueError, match="FreeU"):
        use_openvino_unet(pipe, cache_dir=tmp_path)
    pipe.disable_freeu()
    unet = use_openvino_unet(pipe, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="FreeU"):
        pipe.enable_freeu(0.9, 0.2, 1.5, 1.6)
    with pytest.raises(ValueError, match="already converted"):
        OpenVINOUNetPerShape(unet)


def test_default_cache_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "ov"))
    assert default_cache_dir() == tmp_path / "ov"
    monkeypatch.delenv(CACHE_ENV)
    assert default_cache_dir().parts[-3:] == (".cache", "lcmkit", "openvino")
