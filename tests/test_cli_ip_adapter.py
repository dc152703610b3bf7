"""`--ip-adapter PATH[:SCALE]` and `--ip-image IMAGE` on generate and img2img: the image prompt reaches the pipeline
(the image changes, and equals the Python API's at the same scale); each misuse is one error line, before the
model loads (no image is written)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from helpers.tiny_ip_adapter import ip_state_dict_for, save_image_encoder, save_ip_adapter

from lcmkit import LatentConsistencyModelPipeline
from lcmkit.cli import main


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lcmkit.tiny import build_tiny_lcm

    return build_tiny_lcm(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def adapter(model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ipa")
    unet = LatentConsistencyModelPipeline.from_pretrained(model).unet
    save_image_encoder(folder / "image_encoder")
    return save_ip_adapter(folder / "ip-adapter_sd15.safetensors", ip_state_dict_for(unet))


def noise_png(path: Path, size=(40, 40), seed=0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path)
    return path


def pixels(stdout: str) -> np.ndarray:
    path = stdout.splitlines()[0].partition("\t")[0]
    with PIL.Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def test_generate_and_img2img_with_an_image_prompt(model, adapter, tmp_path, capsys):
    ip_image = noise_png(tmp_path / "style.png")
    base = ["generate", "a cat", "--model", str(model), "--steps", "2", "--seed", "3", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    plain = pixels(capsys.readouterr().out)
    assert (
        main(
            [
                *base,
                "--out",
                str(tmp_path / "ip"),
                "--ip-adapter",
                f"{adapter}:0.8",
                "--ip-image",
                str(ip_image),
            ]
        )
        == 0
    )
    with_ip = pixels(capsys.readouterr().out)
    assert np.abs(with_ip - plain).max() > 2

    pipe = LatentConsistencyModelPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(adapter)
    pipe.set_ip_adapter_scale(0.8)
    api = pipe("a cat", num_inference_steps=2, generator=[torch.Generator().manual_seed(3)],
               ip_adapter_image=PIL.Image.open(ip_image).convert("RGB")).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(api).astype(np.int16), with_ip)

    init = noise_png(tmp_path / "init.png", (32, 32), seed=1)
    argv = ["img2img", str(init), "a cat", "--model", str(model), "--steps", "2", "--seed", "3", "--quiet",
            "--out", str(tmp_path / "i2i"), "--ip-adapter", str(adapter.parent), "--ip-image", str(ip_image)]  # fmt: skip
    assert main(argv) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


ERRORS = [
    (["--ip-adapter", "{adapter}"], "--ip-adapter needs --ip-image"),
    (["--ip-image", "{tmp}/style.png"], "--ip-image needs --ip-adapter"),
    (["--ip-adapter", "{tmp}/nope.safetensors", "--ip-image", "{tmp}/style.png"], "no such file or folder"),
    (["--ip-adapter", "{adapter}:strong", "--ip-image", "{tmp}/style.png"], "the scale in --ip-adapter"),
    (["--ip-adapter", "{adapter}", "--ip-image", "{tmp}/nope.png"], "--ip-image"),
    (["--ip-adapter", "{adapter}", "--ip-image", "{tmp}/notes.txt"], "cannot read image"),
    (["--ip-adapter", "{adapter}", "--ip-image", "{tmp}/style.png", "--fast"], "IP-Adapter needs exact mode"),
    (["--ip-adapter", "{adapter}", "--ip-image", "{tmp}/style.png", "--openvino", "fp32"], "needs exact mode"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "message"), ERRORS, ids=[m for _, m in ERRORS])
def test_errors_are_one_line_before_loading(extra, message, model, adapter, tmp_path, capsys, monkeypatch):
    import lcmkit.cli

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(lcmkit.cli, "load", no_loading)
    noise_png(tmp_path / "style.png")
    (tmp_path / "notes.txt").write_text("not an image")
    extra = [a.format(tmp=tmp_path, adapter=adapter) for a in extra]
    code = main(["generate", "a cat", "--model", str(model), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("lcmkit: error: ") and "\n" not in err, err
    assert message in err
    assert not (tmp_path / "o").exists(), "nothing is generated"
