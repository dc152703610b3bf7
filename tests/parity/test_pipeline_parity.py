"""End-to-end parity: lcmkit's LCM pipelines against diffusers' on the same diffusers-saved tiny folders.

Every comparison is max |lcmkit - diffusers| over the `np` output (images in [0, 1]) and must be <= 1e-4.
Both sides get identically seeded generators, so this also proves the random draws happen in the same order and shapes.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from helpers.reference import assert_close_to_reference

TOL = 1e-4
PROMPTS = ["a red circle on a blue background", "a small green square at the top left"]


@pytest.fixture(scope="module")
def pipes(tiny_folders):
    import diffusers

    import lcmkit

    out = {}
    for name, folder in tiny_folders.items():
        for kind, ours_cls, ref_cls in (
            ("t2i", lcmkit.LatentConsistencyModelPipeline, diffusers.LatentConsistencyModelPipeline),
            (
                "i2i",
                lcmkit.LatentConsistencyModelImg2ImgPipeline,
                diffusers.LatentConsistencyModelImg2ImgPipeline,
            ),
        ):
            ours = ours_cls.from_pretrained(folder)
            ref = ref_cls.from_pretrained(folder)
            ours.set_progress_bar_config(disable=True)
            ref.set_progress_bar_config(disable=True)
            out[name, kind] = (ours, ref)
    return out


def gens(seeds):
    if isinstance(seeds, int):
        return torch.Generator("cpu").manual_seed(seeds)
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def both(pipes, name, kind, seeds, **kwargs):
    ours, ref = pipes[name, kind]
    a = ours(generator=gens(seeds), output_type="np", **kwargs).images
    b = ref(generator=gens(seeds), output_type="np", **kwargs).images
    return a, b


def test_state_dict_keys_identical(pipes):
    """Our modules expose exactly diffusers' parameter names and shapes."""
    for (_name, kind), (ours, ref) in pipes.items():
        if kind != "t2i":
            continue
        for comp in ("unet", "vae"):
            sa = {k: tuple(v.shape) for k, v in getattr(ours, comp).state_dict().items()}
            sb = {k: tuple(v.shape) for k, v in getattr(ref, comp).state_dict().items()}
            assert sa == sb


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_text2img_sd15_single_generator(pipes, steps):
    a, b = both(pipes, "sd15", "t2i", 0, prompt=PROMPTS[0], num_inference_steps=steps, guidance_scale=6.0)
    assert a.shape == (1, 32, 32, 3)
    assert_close_to_reference(a, b, atol=TOL, what="image")


def test_text2img_sd15_batch_generator_list(pipes):
    """Two prompts x two images each, one generator per image."""
    a, b = both(
        pipes,
        "sd15",
        "t2i",
        [1, 2, 3, 4],
        prompt=PROMPTS,
        num_images_per_prompt=2,
        num_inference_steps=3,
        guidance_scale=8.5,
    )
    assert a.shape == (4, 32, 32, 3)
    assert_close_to_reference(a, b, atol=TOL, what="image")


def test_text2img_sd2_vpred_freeu_odd_latents(pipes):
    """SD2-style UNet (linear projections, per-level heads, v-prediction, 3-level VAE) with FreeU, 40x56 px."""
    ours, ref = pipes["sd2", "t2i"]
    ours.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    ref.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    try:
        a, b = both(
            pipes,
            "sd2",
            "t2i",
            3,
            prompt=PROMPTS,
            height=40,
            width=56,
            num_inference_steps=4,
            guidance_scale=7.0,
        )
        plain = ours(
            prompt=PROMPTS, generator=gens(3), height=40, width=56, num_inference_steps=4, output_type="np"
        ).images
    finally:
        ours.disable_freeu()
        ref.disable_freeu()
    assert a.shape == (2, 40, 56, 3)
    assert_close_to_reference(a, b, atol=TOL, what="image")
    assert np.abs(plain - a).max() > 1e-3, "FreeU had no effect"


def test_text2img_vae_tiling(pipes):
    """Tiles of 32 px (16 latents) on a 64x64 image: the decode really runs in overlapping tiles."""
    ours, ref = pipes["sd15", "t2i"]
    for p in (ours, ref):
        p.vae.enable_tiling()
        p.vae.tile_sample_min_size = 32
        p.vae.tile_latent_min_size = 16
    try:
        a, b = both(pipes, "sd15", "t2i", [5, 6], prompt=PROMPTS, height=64, width=64, num_inference_steps=2)
    finally:
        ours.vae.disable_tiling()
        ref.vae.disable_tiling()
    assert_close_to_reference(a, b, atol=TOL, what="image")
    untiled = ours(
        prompt=PROMPTS, generator=gens([5, 6]), height=64, width=64, num_inference_steps=2, output_type="np"
    )
    assert np.abs(untiled.images - a).max() > 0, "tiling path was not taken"


def test_text2img_vae_slicing(pipes):
    ours, ref = pipes["sd15", "t2i"]
    ours.enable_vae_slicing()
    try:
        a, b = both(pipes, "sd15", "t2i", [7, 8], prompt=PROMPTS, num_inference_steps=2)
    finally:
        ours.disable_vae_slicing()
    assert_close_to_reference(a, b, atol=TOL, what="image")


def test_text2img_custom_timesteps_and_original_steps(pipes):
    a, b = both(pipes, "sd15", "t2i", 9, prompt=PROMPTS[0], timesteps=[999, 639, 259])
    assert_close_to_reference(a, b, atol=TOL, what="image")
    a, b = both(pipes, "sd2", "t2i", 9, prompt=PROMPTS[0], num_inference_steps=3, original_inference_steps=40)
    assert_close_to_reference(a, b, atol=TOL, what="image")


def test_text2img_given_latents(pipes):
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(11))
    a, b = both(pipes, "sd15", "t2i", 12, prompt=PROMPTS, latents=latents, num_inference_steps=2)
    assert_close_to_reference(a, b, atol=TOL, what="image")


def _input_image(w=48, h=40):
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("strength,steps", [(0.8, 1), (0.6, 3), (1.0, 4)])
def test_img2img_sd15(pipes, strength, steps):
    a, b = both(
        pipes,
        "sd15",
        "i2i",
        21,
        prompt=PROMPTS[0],
        image=_input_image(),
        strength=strength,
        num_inference_steps=steps,
    )
    assert a.shape == (1, 40, 48, 3)
    assert_close_to_reference(a, b, atol=TOL, what="image")


def test_img2img_batch_generator_list_and_input_kinds(pipes):
    """A PIL image, then the same image as numpy and as a tensor in [0, 1], two prompts, per-image generators."""
    img = _input_image()
    arr = np.asarray(img).astype(np.float32) / 255.0
    for image in (img, arr[None], torch.from_numpy(arr).permute(2, 0, 1)[None], [img, img]):
        a, b = both(
            pipes, "sd15", "i2i", [31, 32], prompt=PROMPTS, image=image, strength=0.7, num_inference_steps=2
        )
        assert_close_to_reference(a, b, atol=TOL, what="image")


def test_img2img_sd2_num_images_per_prompt(pipes):
    a, b = both(
        pipes,
        "sd2",
        "i2i",
        41,
        prompt=PROMPTS[1],
        image=_input_image(64, 48),
        num_images_per_prompt=2,
        strength=0.5,
    )
    assert a.shape == (2, 48, 64, 3)
    assert_close_to_reference(a, b, atol=TOL, what="image")


def test_img2img_tiled_encode_and_decode(pipes):
    ours, ref = pipes["sd15", "i2i"]
    for p in (ours, ref):
        p.vae.enable_tiling()
        p.vae.tile_sample_min_size = 32
        p.vae.tile_latent_min_size = 16
    try:
        a, b = both(
            pipes, "sd15", "i2i", 51, prompt=PROMPTS[0], image=_input_image(80, 56), num_inference_steps=2
        )
    finally:
        ours.vae.disable_tiling()
        ref.vae.disable_tiling()
    assert_close_to_reference(a, b, atol=TOL, what="image")


def test_output_types_agree(pipes):
    """pil / np / pt / latent are views of the same result."""
    ours, _ = pipes["sd15", "t2i"]
    kw = dict(prompt=PROMPTS[0], num_inference_steps=2)
    np_img = ours(generator=gens(3), output_type="np", **kw).images
    pt_img = ours(generator=gens(3), output_type="pt", **kw).images
    pil_img = ours(generator=gens(3), output_type="pil", **kw).images
    latent = ours(generator=gens(3), output_type="latent", **kw).images
    assert isinstance(pt_img, torch.Tensor) and pt_img.shape == (1, 3, 32, 32)
    assert np.abs(pt_img.permute(0, 2, 3, 1).numpy() - np_img).max() < 1e-6
    assert isinstance(pil_img[0], PIL.Image.Image) and pil_img[0].size == (32, 32)
    assert np.abs(np.asarray(pil_img[0]) / 255.0 - np_img[0]).max() <= 1 / 255 + 1e-6
    assert latent.shape == (1, 4, 16, 16)
    with torch.no_grad():
        decoded = ours.vae.decode(latent / ours.vae.config.scaling_factor).sample
    assert np.abs((decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() - np_img).max() < 1e-5


def test_return_dict_false_and_nsfw_none(pipes):
    ours, _ = pipes["sd15", "t2i"]
    images, nsfw = ours(PROMPTS[0], num_inference_steps=1, output_type="np", return_dict=False)
    assert images.shape == (1, 32, 32, 3) and nsfw is None


def test_callback_reads_and_replaces_tensors(pipes):
    """All four callback tensors are offered; zeroing `denoised` at the last step gives an all-zero latent output."""
    ours, _ = pipes["sd15", "t2i"]
    seen = []

    def cb(pipe, i, t, kw):
        seen.append((i, int(t), sorted(kw)))
        if i == pipe.num_timesteps - 1:
            kw["denoised"] = torch.zeros_like(kw["denoised"])
        return kw

    out = ours(
        PROMPTS[0],
        num_inference_steps=3,
        output_type="latent",
        callback_on_step_end=cb,
        callback_on_step_end_tensor_inputs=["latents", "denoised", "prompt_embeds", "w_embedding"],
    ).images
    assert [s[0] for s in seen] == [0, 1, 2]
    assert [s[1] for s in seen] == [999, 659, 339] or len({s[1] for s in seen}) == 3
    assert seen[0][2] == ["denoised", "latents", "prompt_embeds", "w_embedding"]
    assert torch.count_nonzero(out) == 0


def test_clip_skip_matches_hidden_state_reference(pipes):
    """clip_skip=1 uses the penultimate CLIP layer + final LayerNorm. diffusers 0.42.1 fails on clip_skip with
    transformers 5.x (it looks for `text_encoder.text_model`), so the reference is computed from the hidden states
    directly and fed to diffusers as `prompt_embeds`."""
    ours, ref = pipes["sd15", "t2i"]
    ids = ours.tokenizer(
        PROMPTS[0],
        padding="max_length",
        max_length=ours.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        hidden = ours.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        # transformers 4.x nests the encoder under `text_model`; 5.x does not
        layer_norm = getattr(ours.text_encoder, "text_model", ours.text_encoder).final_layer_norm
        embeds = layer_norm(hidden)
    a = ours(PROMPTS[0], clip_skip=1, generator=gens(4), num_inference_steps=2, output_type="np").images
    b = ref(prompt_embeds=embeds, generator=gens(4), num_inference_steps=2, output_type="np").images
    assert_close_to_reference(a, b, atol=TOL, what="image")
    plain = ours(PROMPTS[0], generator=gens(4), num_inference_steps=2, output_type="np").images
    assert np.abs(plain - a).max() > 1e-4, "clip_skip changed nothing"
