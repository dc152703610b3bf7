"""The LCM shipped in the package (`src/lcmkit/assets/tiny-lcm`, made by `scripts/train_tiny.py`).

What these tests prove: the folder is a complete diffusers-layout LCM within the 30 MB budget; diffusers' own
`LatentConsistencyModelPipeline` (and its img2img sibling) loads it and gives the same images as lcmkit (<= 1e-4);
what it draws follows the prompt's shape colour (a palette check on many seeds); `lcmkit generate` with no --model
uses it. The model's known defect (backgrounds ignore the prompt) is recorded as a strict xfail, so a fixed model
turns it into a failure that asks for the marker to go.
"""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from lcmkit import LatentConsistencyModelImg2ImgPipeline, LatentConsistencyModelPipeline, cli
from lcmkit.train.data import COLOURS

FOLDER = cli.DEFAULT_MODEL
TOL = 1e-4
PALETTE_NAMES = list(COLOURS)
PALETTE = np.array([COLOURS[c] for c in PALETTE_NAMES], dtype=np.float64)


def nearest_colour_shares(image: np.ndarray) -> dict[str, float]:
    """The fraction of pixels nearest (RGB distance) to each palette colour; `image` is uint8 (H, W, 3)."""
    pixels = image.reshape(-1, 3).astype(np.float64)
    nearest = np.argmin(((pixels[:, None, :] - PALETTE[None]) ** 2).sum(-1), axis=1)
    counts = np.bincount(nearest, minlength=len(PALETTE_NAMES)) / len(nearest)
    return dict(zip(PALETTE_NAMES, counts.tolist(), strict=True))


def assert_shows(image: np.ndarray, shape_colour: str, background: str) -> None:
    """Background colour dominates; the shape's colour covers at least 1% (a small shape is ~3% of 64x64)."""
    shares = nearest_colour_shares(image)
    top = max(shares, key=shares.get)
    assert top == background, f"most pixels are {top}, not {background}: {shares}"
    assert shares[shape_colour] >= 0.01, f"no {shape_colour} patch: {shares}"


@pytest.fixture(scope="module")
def ours() -> LatentConsistencyModelPipeline:
    pipe = LatentConsistencyModelPipeline.from_pretrained(FOLDER)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folder_is_a_complete_lcm_within_budget():
    assert (FOLDER / "model_index.json").is_file(), f"the shipped model is missing at {FOLDER}"
    index = json.loads((FOLDER / "model_index.json").read_text())
    assert index["_class_name"] == "LatentConsistencyModelPipeline"
    assert index["scheduler"][1] == "LCMScheduler" and index["safety_checker"] == [None, None]
    unet = json.loads((FOLDER / "unet" / "config.json").read_text())
    assert unet["time_cond_proj_dim"], "an LCM UNet takes the guidance scale through its w-embedding"
    total = sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file())
    assert total <= 30 * 2**20, f"the shipped model is {total / 2**20:.1f} MB, over the 30 MB budget"
    assert not (FOLDER / "unet_target").exists(), "only what the pipeline loads is shipped"


@pytest.mark.parametrize("steps, guidance", [(4, 8.5), (1, 1.0), (2, 3.0)])
def test_diffusers_gives_the_same_images(ours, steps, guidance):
    import diffusers

    ref = diffusers.LatentConsistencyModelPipeline.from_pretrained(FOLDER)
    ref.set_progress_bar_config(disable=True)
    prompts = [
        "a red circle on a blue background",
        "a small yellow square at the top left on a black background",
    ]
    kwargs = {"num_inference_steps": steps, "guidance_scale": guidance, "output_type": "np"}
    a = ours(prompts, generator=torch.Generator().manual_seed(3), **kwargs).images
    b = ref(prompts, generator=torch.Generator().manual_seed(3), **kwargs).images
    assert a.shape == b.shape == (2, 64, 64, 3)
    assert float(np.abs(a - b).max()) <= TOL


def test_diffusers_img2img_gives_the_same_images():
    import diffusers

    ours = LatentConsistencyModelImg2ImgPipeline.from_pretrained(FOLDER)
    ref = diffusers.LatentConsistencyModelImg2ImgPipeline.from_pretrained(FOLDER)
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
    image = PIL.Image.new("RGB", (64, 64), COLOURS["green"])
    kwargs = {"image": image, "num_inference_steps": 4, "strength": 0.6, "output_type": "np"}
    a = ours("a white diamond on a green background", generator=torch.Generator().manual_seed(1), **kwargs)
    b = ref("a white diamond on a green background", generator=torch.Generator().manual_seed(1), **kwargs)
    assert float(np.abs(a.images - b.images).max()) <= TOL


def render(pipe, prompt: str, seeds: range, guidance: float = 8.5) -> list[np.ndarray]:
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe(
        [prompt] * len(seeds),
        num_inference_steps=4,
        guidance_scale=guidance,
        generator=gens,
        output_type="np",
    )
    return [(image * 255).round().astype(np.uint8) for image in out.images]


@pytest.mark.parametrize(
    "shape_colour, shape, background",
    [("yellow", "square", "black"), ("white", "triangle", "purple"), ("blue", "circle", "orange")],
)
def test_shapes_take_the_prompted_colour(ours, shape_colour, shape, background):
    """At the CLI's defaults (4 steps, guidance 8.5), at least 12 of 16 seeds show a patch of the shape's colour.

    Measured on the shipped model: 15-16 of 16 for these prompts. "red" is left out because the model often draws
    red shapes as orange (6 of 16 for a red circle), which the next test records.
    """
    images = render(ours, f"a {shape_colour} {shape} on a {background} background", range(16))
    hits = sum(nearest_colour_shares(image)[shape_colour] >= 0.01 for image in images)
    assert hits >= 12, f"only {hits} of 16 images have a {shape_colour} patch"


@pytest.mark.xfail(
    strict=True,
    reason="known defect of the shipped model (issue 5 open): the background colour barely follows the prompt "
    "(the prompted background wins in about 1 of 7 seeds, chance level) and red shapes often come out orange",
)
def test_images_show_the_whole_prompt(ours):
    """The issue's bar: "a red circle on a blue background" shows a red patch on a mostly blue image, every seed."""
    for image in render(ours, "a red circle on a blue background", range(4)):
        assert_shows(image, "red", "blue")


def test_cli_default_model_is_the_shipped_one(tmp_path, capsys):
    """`lcmkit generate "a red circle on a blue background"` with no --model runs the shipped model at 64x64."""
    assert cli.main(["generate", "a red circle on a blue background", "--out", str(tmp_path), "--quiet"]) == 0
    path = capsys.readouterr().out.split()[0]
    with PIL.Image.open(path) as im:
        assert im.size == (64, 64)
        assert "Model: tiny-lcm" in im.text["parameters"]
        assert (
            nearest_colour_shares(np.asarray(im.convert("RGB")))["red"]
            + nearest_colour_shares(np.asarray(im.convert("RGB")))["orange"]
            >= 0.01
        )
