"""Real classifier-free guidance and negative prompts.

1. A UNet without w-embedding (the LCM-LoRA case): our LCM pipeline at guidance 1.5 with a negative prompt matches
   diffusers' StableDiffusionPipeline with an LCMScheduler on the same weights (<= 1e-4), as do guidance 1.5 with the
   default "" negative and guidance 1.0 (no CFG).
2. Where diffusers has no pipeline to compare with (img2img with real CFG; an LCM UNet with a negative prompt, our
   opt-in), a loop written out in this test on diffusers' own text encoder, UNet, scheduler and VAE is the reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.reference import assert_close_to_reference, max_abs_diff

from lcmkit import LatentConsistencyModelImg2ImgPipeline, LatentConsistencyModelPipeline

TOL = 1e-4
PROMPTS = ["a red circle on a blue background", "a yellow square"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def encode_with_transformers(folder, prompt: str) -> torch.Tensor:
    """The prompt's last hidden state from the folder's own CLIP tokenizer and text encoder (padded to 77)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids  # fmt: skip
    return text_encoder(ids)[0]


def reference_cfg_loop(
    folder, prompt, negative, scale, steps, generator, *, w_emb=None, image=None, strength=1.0
):
    """LCM sampling with real CFG written out on diffusers' components from `folder`, as a numpy image batch.

    1. timesteps from LCMScheduler.set_timesteps(steps, strength); 2. x = noise (text2img), or
    add_noise(z0, noise, first timestep) with z0 drawn from the VAE posterior of `image` in [0, 1] (img2img);
    3. each step: eps = eps_neg + scale * (eps_pos - eps_neg) on one batch [negative, prompt], then the
    scheduler's step; 4. decode the last denoised latents and map [-1, 1] to [0, 1].
    """
    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    sched = LCMScheduler.from_pretrained(folder / "scheduler")
    sched.set_timesteps(steps, strength=strength)
    with torch.no_grad():
        context = torch.cat(
            [encode_with_transformers(folder, negative), encode_with_transformers(folder, prompt)]
        )
        if image is None:
            x = torch.randn((1, 4, 16, 16), generator=generator)
        else:
            z0 = vae.encode(image * 2 - 1).latent_dist.sample(generator) * vae.config.scaling_factor
            x = sched.add_noise(z0, torch.randn(z0.shape, generator=generator), sched.timesteps[:1])
        extra = {} if w_emb is None else {"timestep_cond": torch.cat([w_emb, w_emb])}
        for t in sched.timesteps:
            uncond, cond = unet(torch.cat([x, x]), t, encoder_hidden_states=context, **extra).sample.chunk(2)
            x, denoised = sched.step(
                uncond + scale * (cond - uncond), t, x, generator=generator, return_dict=False
            )
        decoded = vae.decode(denoised / vae.config.scaling_factor).sample
    return (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def plain(tiny_folders):
    from diffusers import StableDiffusionPipeline

    folder = tiny_folders["sd15_plain"]
    ours = LatentConsistencyModelPipeline.from_pretrained(folder)
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    return ours, ref


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(guidance_scale=1.5, negative_prompt=["blurry, dark", "low quality"]),
        dict(guidance_scale=1.5),
        dict(guidance_scale=1.0),
        dict(guidance_scale=2.0, negative_prompt="noise", num_images_per_prompt=2),
    ],
)
def test_lcm_lora_style_cfg_matches_sd_pipeline(plain, kwargs):
    ours, ref = plain
    n = len(PROMPTS) * kwargs.get("num_images_per_prompt", 1)
    gens = [gen(10 + i) for i in range(n)]
    a = ours(PROMPTS, num_inference_steps=4, generator=gens, output_type="np", **kwargs).images
    gens = [gen(10 + i) for i in range(n)]
    # we broadcast one negative string over the prompts; diffusers wants a list
    if isinstance(kwargs.get("negative_prompt"), str):
        kwargs = {**kwargs, "negative_prompt": [kwargs["negative_prompt"]] * len(PROMPTS)}
    b = ref(PROMPTS, num_inference_steps=4, generator=gens, output_type="np", **kwargs).images
    assert a.shape == (n, 32, 32, 3)
    assert_close_to_reference(a, b, atol=TOL, what="image")
    assert ours.do_classifier_free_guidance == (kwargs["guidance_scale"] > 1)


def test_negative_prompt_changes_the_image(plain):
    ours, _ = plain
    a = ours(PROMPTS[0], guidance_scale=1.5, generator=gen(1), output_type="np").images
    b = ours(PROMPTS[0], guidance_scale=1.5, negative_prompt="red", generator=gen(1), output_type="np").images
    assert max_abs_diff(a, b) > 1e-3


def test_img2img_with_cfg_matches_written_out_loop(plain, tiny_folders):
    """img2img on a plain UNet with guidance 1.5 and a negative prompt: diffusers' LCM img2img pipeline has no CFG,
    so the reference is the loop written out above, started from the encoded image at strength 0.8."""
    ours, _ = plain
    i2i = LatentConsistencyModelImg2ImgPipeline.from_pipe(ours)
    image = np.random.default_rng(0).random((1, 32, 32, 3), dtype=np.float32)
    kwargs = dict(guidance_scale=1.5, negative_prompt="blur", num_inference_steps=4, strength=0.8)
    out = i2i(PROMPTS[0], image=image, generator=gen(2), output_type="np", **kwargs).images
    expected = reference_cfg_loop(
        tiny_folders["sd15_plain"], PROMPTS[0], "blur", 1.5, 4, gen(2),
        image=torch.from_numpy(image).permute(0, 3, 1, 2), strength=0.8,
    )  # fmt: skip
    assert_close_to_reference(out, expected, atol=TOL, what="img2img image with CFG")
    no_cfg = i2i(
        PROMPTS[0], image=image, generator=gen(2), output_type="np", **{**kwargs, "guidance_scale": 1.0}
    )
    assert max_abs_diff(out, no_cfg.images) > 1e-3  # guidance 1.5 really guided


def test_w_embedding_unet_negative_prompt_opt_in(tiny_folders):
    """LCM UNet + negative prompt: CFG between prompt and negative at `negative_guidance_scale`, w-embedding on both."""
    folder = tiny_folders["sd15"]
    ours = LatentConsistencyModelPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    g, s = 6.0, 2.5
    a = ours(
        PROMPTS[0],
        negative_prompt="blurry",
        guidance_scale=g,
        negative_guidance_scale=s,
        num_inference_steps=3,
        generator=gen(5),
        output_type="np",
    ).images

    half = 16  # w-embedding: sin/cos of 1000 (w - 1) at frequencies exp(-i ln(1e4) / (half - 1))
    freqs = torch.exp(-torch.arange(half, dtype=torch.float32) * (np.log(10000.0) / (half - 1)))
    arg = (g - 1) * 1000.0 * freqs
    w_emb = torch.cat([torch.sin(arg), torch.cos(arg)])[None]
    b = reference_cfg_loop(folder, PROMPTS[0], "blurry", s, 3, gen(5), w_emb=w_emb)
    assert_close_to_reference(a, b, atol=TOL, what="image with negative prompt")
    plain_out = ours(
        PROMPTS[0], guidance_scale=g, num_inference_steps=3, generator=gen(5), output_type="np"
    ).images
    assert max_abs_diff(a, plain_out) > 1e-3
    off = ours(PROMPTS[0], negative_prompt="blurry", negative_guidance_scale=1.0, guidance_scale=g,
               num_inference_steps=3, generator=gen(5), output_type="np").images  # fmt: skip
    assert max_abs_diff(off, plain_out) == 0.0
