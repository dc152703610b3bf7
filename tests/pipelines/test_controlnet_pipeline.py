"""The ControlNet arguments of both LCM pipelines: each bad value is a ValueError naming the argument, before the
UNet runs; the component travels with `from_pipe` and `.components`; the OpenVINO fast mode is refused with a message
that says ControlNet needs exact mode. (Numbers against diffusers: tests/parity/test_controlnet_parity.py.)"""

from __future__ import annotations

import dataclasses

import numpy as np
import PIL.Image
import pytest
import torch
from helpers.tiny_controlnet import save_diffusers_controlnet

from lcmkit import LatentConsistencyModelImg2ImgPipeline, LatentConsistencyModelPipeline
from lcmkit.loading.controlnet import load_controlnet
from lcmkit.runtime import FastPaths

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def pipe(tiny_folders, tmp_path_factory):
    nets = [
        load_controlnet(save_diffusers_controlnet(tmp_path_factory.mktemp(f"cn{i}"), seed=i))
        for i in range(2)
    ]
    p = LatentConsistencyModelPipeline.from_pretrained(tiny_folders["sd15"], controlnet=nets)
    p.set_progress_bar_config(disable=True)
    return p


IMAGE = PIL.Image.new("RGB", (32, 32), (200, 10, 10))

BAD = [
    (dict(control_image=IMAGE), "must be a list of 2 images"),
    (dict(control_image=[IMAGE]), "must be a list of 2 images, one per ControlNet; got 1"),
    (dict(control_image=None), "pass `control_image`"),
    (dict(controlnet_conditioning_scale=[1.0, 0.5, 0.2]), "`controlnet_conditioning_scale` has 3 entries for 2"),
    (dict(controlnet_conditioning_scale=float("nan")), "`controlnet_conditioning_scale` must hold finite numbers"),
    (dict(control_guidance_start=0.5, control_guidance_end=0.5), "need 0 <= start < end <= 1"),
    (dict(control_guidance_start=[0.0, -0.1]), "control_guidance_start=-0.1"),
    (dict(control_guidance_end=[1.0, 1.5]), "control_guidance_end=1.5"),
    (dict(control_guidance_end=[1.0]), "`control_guidance_end` has 1 entries for 2"),
    (dict(guess_mode=True), "guess_mode=True is not supported"),
    (dict(control_image=[IMAGE, IMAGE], image=[IMAGE, IMAGE]), "not both"),
    (dict(control_image=[IMAGE, "edges.png"]), "a control image must be"),
    (dict(control_image=[IMAGE, torch.rand(3, 3, 32, 32)]), "3 control images for 1 prompt"),
    (dict(control_image=[[IMAGE, IMAGE, IMAGE]]), "each with 2 images"),
    (dict(control_image=[IMAGE, [IMAGE, IMAGE]]), "rows of lengths ['not a list', 2]"),
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_control_arguments_name_the_argument(pipe, kwargs, message, monkeypatch):
    kwargs = {"control_image": [IMAGE, IMAGE], **kwargs}

    def no_unet(*args, **kw):
        raise AssertionError("the UNet must not run")

    monkeypatch.setattr(pipe.unet, "forward", no_unet)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        pipe("x", num_inference_steps=1, output_type="np", **kwargs)


def test_control_image_without_a_controlnet_is_refused(pipe):
    plain = LatentConsistencyModelPipeline.from_pipe(pipe, controlnet=None)
    with pytest.raises(ValueError, match="no ControlNet"):
        plain("x", num_inference_steps=1, control_image=IMAGE, output_type="np")


def test_component_travels_and_image_forms_agree(pipe):
    assert isinstance(pipe.controlnet, list) and len(pipe.controlnet) == 2
    assert (
        "controlnet" not in pipe.components
    )  # the LCM pipelines' diffusers components; from_pipe carries it
    i2i = LatentConsistencyModelImg2ImgPipeline.from_pipe(pipe)
    assert i2i.controlnet == pipe.controlnet
    # the same picture as PIL, as a float array and as a tensor: the same image (no resize at the output size)
    array = np.asarray(IMAGE, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    runs = [
        pipe("x", num_inference_steps=1, control_image=[c, c], generator=torch.Generator().manual_seed(0), output_type="np").images
        for c in (IMAGE, array, tensor)
    ]  # fmt: skip
    assert np.abs(runs[0] - runs[1]).max() < 1e-6 and np.abs(runs[0] - runs[2]).max() < 1e-6
    # img2img: the control image is resized to the input image's size
    out = i2i("x", image=PIL.Image.new("RGB", (40, 24)), control_image=[IMAGE, IMAGE], num_inference_steps=2,
              strength=0.5, output_type="np").images  # fmt: skip
    assert out.shape == (1, 24, 40, 3)


def test_controlnet_sources_load_at_from_pretrained(tiny_folders, tmp_path):
    folder = save_diffusers_controlnet(tmp_path / "cn")
    pipe = LatentConsistencyModelPipeline.from_pretrained(
        tiny_folders["sd15"], controlnet=[folder, str(folder)]
    )
    assert len(pipe.controlnet) == 2 and pipe.controlnet[0].name_or_path == str(folder)
    with pytest.raises(TypeError, match="controlnet must be a lcmkit ControlNetModel"):
        pipe.controlnet = "not a model"


def test_openvino_fast_mode_says_controlnet_needs_exact_mode(pipe):
    fast = LatentConsistencyModelPipeline.from_pipe(pipe)
    fast._fast_paths = dataclasses.replace(
        FastPaths.default(), backend="openvino"
    )  # as enable_fast leaves it
    with pytest.raises(ValueError, match="ControlNet needs exact mode"):
        fast("x", num_inference_steps=1, control_image=[IMAGE, IMAGE])
