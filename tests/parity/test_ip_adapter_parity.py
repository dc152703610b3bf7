"""IP-Adapter end to end against diffusers, on the same tiny diffusers-saved pipelines and the same tiny adapter files
(`helpers.tiny_ip_adapter`: an h94-layout file plus a random CLIPVisionModelWithProjection folder), loaded into both
through `load_ip_adapter`. Every image comparison is max |lcmkit - diffusers| over `np` outputs, <= 1e-4.

- text-to-image with the LCM UNet (w-embedding, no CFG): the plain adapter (safetensors and `.bin`) and the plus
  resampler, at scales 1 and 0.5, from `ip_adapter_image` and from precomputed `ip_adapter_image_embeds`;
- real classifier-free guidance (a UNet without w-embedding, guidance 1.5) against diffusers' StableDiffusionPipeline
  with the same LCMScheduler: the unconditional side sees the projection of zero embeddings;
- image-to-image against diffusers' LCM img2img pipeline;
- scale 0 gives exactly the image of the pipeline without an adapter, and unloading restores it exactly.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from helpers.reference import assert_close_to_reference, max_abs_diff
from helpers.tiny_ip_adapter import ip_state_dict, save_image_encoder, save_ip_adapter

from lcmkit import LatentConsistencyModelImg2ImgPipeline, LatentConsistencyModelPipeline

TOL = 1e-4
PLAIN = "ip-adapter_sd15.safetensors"
PLAIN_BIN = "ip-adapter_sd15.bin"
PLUS = "ip-adapter-plus_sd15.safetensors"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def picture(seed: int = 0, size=(40, 48)) -> PIL.Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


@pytest.fixture(scope="module")
def ip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ip")
    save_image_encoder(folder / "image_encoder")
    save_ip_adapter(folder / PLAIN, ip_state_dict("plain"))
    save_ip_adapter(folder / PLAIN_BIN, ip_state_dict("plain"))
    save_ip_adapter(folder / PLUS, ip_state_dict("plus", seed=1))
    return folder


def load_both(ours, ref, folder, weight_name):
    ours.load_ip_adapter(folder, subfolder="", weight_name=weight_name, image_encoder_folder="image_encoder")
    # diffusers builds the resampler on the meta device with low_cpu_mem_usage and fills it; plain loading is simpler
    ref.load_ip_adapter(
        str(folder), subfolder="", weight_name=weight_name, image_encoder_folder="image_encoder",
        low_cpu_mem_usage=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def t2i(tiny_folders):
    import diffusers

    folder = tiny_folders["sd15"]
    ours = LatentConsistencyModelPipeline.from_pretrained(folder)
    ref = diffusers.LatentConsistencyModelPipeline.from_pretrained(folder)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    return ours, ref


@pytest.mark.parametrize(
    "weight_name, scale", [(PLAIN, 1.0), (PLAIN, 0.5), (PLAIN_BIN, 0.8), (PLUS, 1.0), (PLUS, 0.5)]
)
def test_text2img_matches_diffusers(t2i, ip_folder, weight_name, scale):
    ours, ref = t2i
    load_both(ours, ref, ip_folder, weight_name)
    for p in (ours, ref):
        p.set_ip_adapter_scale(scale)
    kwargs = dict(num_inference_steps=2, output_type="np", ip_adapter_image=picture())
    a = ours(["a red circle", "a blue square"], generator=[gen(1), gen(2)], **kwargs).images
    b = ref(["a red circle", "a blue square"], generator=[gen(1), gen(2)], **kwargs).images
    assert_close_to_reference(a, b, atol=TOL, what=f"{weight_name} at scale {scale}")
    ours.unload_ip_adapter()
    plain = ours(["a red circle", "a blue square"], generator=[gen(1), gen(2)], num_inference_steps=2,
                 output_type="np").images  # fmt: skip
    assert max_abs_diff(a, plain) > 1e-3  # the image prompt changed the images


def test_precomputed_embeds_match_the_image_path(t2i, ip_folder):
    """`prepare_ip_adapter_image_embeds` output fed back as `ip_adapter_image_embeds` (as diffusers documents it),
    on both sides; and our two ways of passing the image prompt agree exactly."""
    ours, ref = t2i
    load_both(ours, ref, ip_folder, PLUS)
    image = [[picture(1), picture(2)]]  # two images on the one adapter: their tokens are concatenated
    embeds = ours.prepare_ip_adapter_image_embeds(image, None, torch.device("cpu"), 1, False)
    ref_embeds = ref.prepare_ip_adapter_image_embeds(image, None, torch.device("cpu"), 1, False)
    assert_close_to_reference(embeds[0], ref_embeds[0], atol=1e-6, what="image embeds")
    a = ours(
        "a cat", generator=gen(3), num_inference_steps=2, output_type="np", ip_adapter_image_embeds=embeds
    )
    b = ref(
        "a cat", generator=gen(3), num_inference_steps=2, output_type="np", ip_adapter_image_embeds=embeds
    )
    c = ours("a cat", generator=gen(3), num_inference_steps=2, output_type="np", ip_adapter_image=image)
    assert_close_to_reference(a.images, b.images, atol=TOL, what="from precomputed embeds")
    assert np.array_equal(a.images, c.images)


def test_scale_zero_and_unload_give_the_plain_images_exactly(t2i, ip_folder):
    ours, ref = t2i
    ours.unload_ip_adapter()
    call = dict(num_inference_steps=2, output_type="np")
    plain = ours("a red circle", generator=gen(5), **call).images
    ours.load_ip_adapter(ip_folder, weight_name=PLAIN)
    ours.set_ip_adapter_scale(0.0)
    off = ours("a red circle", generator=gen(5), ip_adapter_image=picture(), **call).images
    ours.set_ip_adapter_scale(1.0)
    on = ours("a red circle", generator=gen(5), ip_adapter_image=picture(), **call).images
    ours.unload_ip_adapter()
    after = ours("a red circle", generator=gen(5), **call).images
    assert np.array_equal(off, plain)
    assert np.array_equal(after, plain)
    assert max_abs_diff(on, plain) > 1e-3
    assert ours.image_encoder is None and ours.unet.image_proj is None
    assert not any("_ip" in k or "image_proj" in k for k in ours.unet.state_dict())


def test_real_cfg_matches_sd_pipeline(tiny_folders, ip_folder):
    """A UNet without w-embedding at guidance 1.5: both branches in one batch, the unconditional one with the
    projection of zero image embeddings, against diffusers' StableDiffusionPipeline (same LCMScheduler)."""
    from diffusers import StableDiffusionPipeline

    folder = tiny_folders["sd15_plain"]
    ours = LatentConsistencyModelPipeline.from_pretrained(folder)
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    load_both(ours, ref, ip_folder, PLAIN)
    for p in (ours, ref):
        p.set_ip_adapter_scale(0.7)
    kwargs = dict(guidance_scale=1.5, num_inference_steps=3, output_type="np", ip_adapter_image=picture(4))
    a = ours("a yellow square", negative_prompt="blurry", generator=gen(7), **kwargs).images
    b = ref("a yellow square", negative_prompt="blurry", generator=gen(7), **kwargs).images
    assert ours.do_classifier_free_guidance
    assert_close_to_reference(a, b, atol=TOL, what="IP-Adapter with real CFG")


def test_img2img_matches_diffusers(tiny_folders, ip_folder):
    import diffusers

    folder = tiny_folders["sd15"]
    ours = LatentConsistencyModelImg2ImgPipeline.from_pretrained(folder)
    ref = diffusers.LatentConsistencyModelImg2ImgPipeline.from_pretrained(folder)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    load_both(ours, ref, ip_folder, PLAIN)
    init = picture(9, size=(32, 32))
    kwargs = dict(
        image=init, strength=0.7, num_inference_steps=3, output_type="np", ip_adapter_image=picture(8)
    )
    a = ours("a green field", generator=gen(11), **kwargs).images
    b = ref("a green field", generator=gen(11), **kwargs).images
    assert_close_to_reference(a, b, atol=TOL, what="img2img with IP-Adapter")
