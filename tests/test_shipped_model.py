"""The LCM shipped in the package (`src/lcmkit/assets/tiny-lcm`, made by `scripts/train_tiny.py`).

What these tests prove: the folder is a complete diffusers-layout LCM within the 30 MB budget; diffusers' own
`LatentConsistencyModelPipeline` (and its img2img sibling) loads it and gives the same images as lcmkit (<= 1e-4);
what it draws follows the prompt (a palette check on many seeds: "a red circle on a blue background", the issue's
prompt, and other shape colours); `lcmkit generate` with no --model uses it and draws that prompt; backgrounds
follow the caption, not the initial noise.
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
TINY_VAE = FOLDER.with_name("tiny-lcm-taesd")  # its fast-mode decoder (AutoencoderTiny layout)
TOL = 1e-4
BG_MIN = 7
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
    total = sum(p.stat().st_size for f in (FOLDER, TINY_VAE) for p in f.rglob("*") if p.is_file())
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
    [
        ("yellow", "square", "black"),
        ("white", "triangle", "purple"),
        ("blue", "circle", "orange"),
        ("green", "square", "red"),
    ],
)
def test_shapes_take_the_prompted_colour(ours, shape_colour, shape, background):
    """At the CLI's defaults (4 steps, guidance 8.5), at least 12 of 16 seeds show a patch of the shape's colour
    (measured on the model shipped 2026-11-27: 13 to 16 of 16)."""
    images = render(ours, f"a {shape_colour} {shape} on a {background} background", range(16))
    hits = sum(nearest_colour_shares(image)[shape_colour] >= 0.01 for image in images)
    assert hits >= 12, f"only {hits} of 16 images have a {shape_colour} patch"


def test_images_show_the_whole_prompt(ours):
    """The issue's bar: "a red circle on a blue background" at the CLI's defaults shows a red patch on a mostly
    blue image, in at least 14 of 16 seeds (measured 15 of 16: seed 1 draws the circle dark olive-red, nearest
    black in the palette). The model shipped before the teacher's learning-rate decay drew it orange: 0 to 1
    of 16."""
    shown = []
    for seed, image in enumerate(render(ours, "a red circle on a blue background", range(16))):
        try:
            assert_shows(image, "red", "blue")
            shown.append(seed)
        except AssertionError:
            pass
    assert len(shown) >= 14, f"only seeds {shown} of 16 show a red circle on a blue background"


def test_background_follows_the_caption_not_the_noise(ours):
    """One initial noise x_T for every caption; only the background word changes (8 colours, a shape of another
    colour). The most common pixel colour must be the prompted background in at least BG_MIN of 8, for each of two
    x_T. The model shipped before offset noise failed this: the same x_T gave the same background for every
    caption (its backgrounds followed x_T's mean, 1-2 of 8 right)."""
    names = list(COLOURS)
    for seed in (0, 1):
        x_T = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed)).expand(8, -1, -1, -1)
        prompts = [f"a {names[(i + 3) % 8]} circle on a {bg} background" for i, bg in enumerate(names)]
        out = ours(prompts, num_inference_steps=4, guidance_scale=8.5, latents=x_T.clone(), output_type="np")
        images = (out.images * 255).round().astype(np.uint8)
        tops = [max(shares := nearest_colour_shares(image), key=shares.get) for image in images]
        right = sum(top == bg for top, bg in zip(tops, names, strict=True))
        assert right >= BG_MIN, f"x_T seed {seed}: backgrounds {tops} for prompts {names}"


def test_cli_default_model_is_the_shipped_one(tmp_path, capsys):
    """`lcmkit generate "a red circle on a blue background"` with no --model runs the shipped model at 64x64.

    A fixed seed: without one the CLI draws a random seed (the test above measures how many seeds show the
    prompt)."""
    argv = ["generate", "a red circle on a blue background", "--out", str(tmp_path), "--quiet", "--seed", "0"]
    assert cli.main(argv) == 0
    path = capsys.readouterr().out.split()[0]
    with PIL.Image.open(path) as im:
        assert im.size == (64, 64)
        assert "Model: tiny-lcm" in im.text["parameters"]
        assert_shows(np.asarray(im.convert("RGB")), "red", "blue")
    assert cli.main([*argv, "--tiny-vae", str(TINY_VAE)]) == 0  # fast mode's decoder, same size
    with PIL.Image.open(capsys.readouterr().out.split()[0]) as im:
        assert im.size == (64, 64)


def test_shipped_tiny_vae_imitates_the_models_vae(ours):
    """The shipped TAESD-layout decoder turns latents into nearly the VAE's images, mean PSNR against the VAE's:
    >= 32 dB on the VAE's latents of 32 held-out scenes (measured 34.5 dB) and >= 29 dB on 16 LCM outputs, the
    latents fast mode decodes (measured 31.0 dB; it learned on both; benchmarks/fast_mode_quality.py measured
    33.2 dB on 200 outputs at guidance 8.5). The decoder shipped before the recipe's longer, decaying schedule
    measured 28.7 and 25.1 dB here.
    The CLI test above runs it through --tiny-vae."""
    from lcmkit.models.tiny_vae import AutoencoderTiny
    from lcmkit.train.data import WorldConfig, sample_scene
    from lcmkit.train.eval import EVAL_WORLD_SEED, render_batch

    tiny = AutoencoderTiny.from_pretrained(TINY_VAE).eval()
    assert tiny.config.decoder_scale == ours.vae_scale_factor
    x = render_batch(
        [sample_scene(WorldConfig(image_size=64, seed=EVAL_WORLD_SEED, max_shapes=1), i) for i in range(32)]
    )
    s = ours.vae.config.scaling_factor
    backgrounds = PALETTE_NAMES[1:] + PALETTE_NAMES[:1]  # each square on the next colour
    prompts = [
        f"a {c} square on a {b} background" for c, b in zip(PALETTE_NAMES, backgrounds, strict=True)
    ] * 2
    sampled = ours(
        prompts, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent"
    )
    with torch.no_grad():
        encoded = ours.vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(0)) * s
        for name, z, bar in (("encoder", encoded, 32), ("LCM output", sampled.images, 29)):
            exact = ours.vae.decode(z / s).sample.clamp(-1, 1)
            fast = tiny.decode(z / tiny.config.scaling_factor).sample.clamp(-1, 1)  # as the pipeline decodes
            mse = ((fast - exact) / 2).pow(2).flatten(1).mean(1)
            psnr = float((10 * torch.log10(1 / mse)).mean())
            assert psnr >= bar, f"tiny decoder PSNR against the VAE on {name} latents: {psnr:.1f} dB"
