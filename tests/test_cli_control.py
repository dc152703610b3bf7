"""`lcmkit generate/img2img --control KIND=IMAGE[,scale=S][,start=A][,end=B] --controlnet KIND=PATH_OR_ID`.

Bad input is refused in one line before any model loads; runs with a tiny random ControlNet saved as a folder write
images that differ from the same seed without it; the ControlNet reaches the pipeline with its scale and
start/end.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from lcmkit import cli
from lcmkit.cli import main
from lcmkit.config import ControlNetConfig, UNetConfig
from lcmkit.control import control_call_kwargs
from lcmkit.models.controlnet import ControlNetModel


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lcmkit.tiny import build_tiny_lcm

    return build_tiny_lcm(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def controlnet(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random ControlNet that fits the tiny model's UNet (hint encoder: one stride-2 step per VAE level)."""
    unet = UNetConfig.from_diffusers(json.loads((model / "unet" / "config.json").read_text()))
    levels = len(json.loads((model / "vae" / "config.json").read_text())["block_out_channels"])
    fields = {f.name: getattr(unet, f.name) for f in dataclasses.fields(UNetConfig)}
    config = ControlNetConfig(
        **{**fields, "time_cond_proj_dim": None}, conditioning_embedding_out_channels=(8,) * levels
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("controlnet") / "cn"
    ControlNetModel(config).save_pretrained(folder)
    return folder


def picture(path: Path, size=(64, 64)) -> Path:
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[16:48, 16:48] = 255
    PIL.Image.fromarray(pixels).save(path)
    return path


def image_of(stdout: str) -> np.ndarray:
    path = stdout.strip().splitlines()[-1].split("\t")[0]
    return np.asarray(PIL.Image.open(path), dtype=np.float32)


BAD = [
    (["--control", "xray={img}"], "unknown control kind 'xray'"),
    (["--control", "depth"], "--control takes KIND=IMAGE"),
    (["--control", "depth={tmp}/missing.png"], "--control depth: image not found"),
    (["--control", "depth={img},end=1.5"], "start=0, end=1.5; need 0 <= start < end <= 1"),
    (["--control", "depth={img},start=0.6,end=0.4"], "start=0.6, end=0.4"),
    (["--control", "depth={img},scale=lots"], "scale must be a number, got 'lots'"),
    (["--control", "depth={img},scale=inf"], "scale must be a finite number"),
    (["--controlnet", "depth={tmp}/nothing-here"], "no --control depth=IMAGE uses it"),
    (["--control", "depth={img}", "--controlnet", "depth={tmp}/nothing-here"], "no such file or folder"),
    (["--control", "depth={img}", "--fast"], "ControlNet needs exact mode"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_control_is_refused_before_the_model_loads(argv, message, model, tmp_path, monkeypatch, capsys):
    img = picture(tmp_path / "img.png")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(cli, "load", no_loading)
    argv = [a.format(tmp=tmp_path, img=img) for a in argv]
    status = main(["generate", "x", "--model", str(model), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and message.format(tmp=tmp_path) in err, err


def test_generate_and_img2img_with_a_controlnet_folder(model, controlnet, tmp_path, capsys):
    img = picture(tmp_path / "square.png")
    base = ["--model", str(model), "--steps", "2", "--seed", "3", "--size", "64x64", "--quiet"]
    assert main(["generate", "a cat", *base, "--out", str(tmp_path / "plain")]) == 0
    plain = image_of(capsys.readouterr().out)
    assert main(["generate", "a cat", *base, "--out", str(tmp_path / "cn"),
                 "--control", f"depth={img}", "--controlnet", f"depth={controlnet}"]) == 0  # fmt: skip
    steered = image_of(capsys.readouterr().out)
    assert steered.shape == plain.shape == (64, 64, 3)
    assert np.abs(steered - plain).max() > 1
    # two nets (canny edges computed from the picture, and the picture as a depth map), scales and a schedule
    assert main(["generate", "a cat", *base, "--out", str(tmp_path / "two"),
                 "--control", f"canny={img},scale=0.5,end=0.5", "--control", f"depth={img},start=0.5",
                 "--controlnet", f"canny={controlnet}", "--controlnet", f"depth={controlnet}"]) == 0  # fmt: skip
    two = image_of(capsys.readouterr().out)
    assert np.abs(two - steered).max() > 1
    init = picture(tmp_path / "init.png", size=(48, 48))
    assert main(["img2img", str(init), "a cat", "--model", str(model), "--steps", "2", "--seed", "3", "--quiet",
                 "--out", str(tmp_path / "i2i"), "--control", f"depth={img}", "--controlnet", f"depth={controlnet}"]) == 0  # fmt: skip
    assert image_of(capsys.readouterr().out).shape == (
        48,
        48,
        3,
    )  # the control image follows the input's size


def test_the_spec_loads_the_nets_and_the_request_carries_their_settings(model, controlnet, tmp_path):
    img = picture(tmp_path / "p.png")
    args = cli.build_parser().parse_args(
        [
            "generate",
            "x",
            "--model",
            str(model),
            "--control",
            f"depth={img},scale=0.7,start=0.25",
            "--control",
            "canny=" + str(img),
            "--controlnet",
            f"depth={controlnet}",
        ]  # fmt: skip
    )
    args.control_units = cli.control_units(args)
    spec = cli.model_spec(args)
    assert spec.controlnets == (("depth", str(controlnet)), ("canny", "lllyasviel/control_v11p_sd15_canny"))
    kwargs = control_call_kwargs(args.control_units)
    assert kwargs["controlnet_conditioning_scale"] == [0.7, 1.0]
    assert kwargs["control_guidance_start"] == [0.25, 0.0] and kwargs["control_guidance_end"] == [1.0, 1.0]
    edges = np.asarray(kwargs["control_image"][1])
    assert edges.max() == 255 and not edges[24:40, 24:40].any()  # canny: the square's border, not its inside
