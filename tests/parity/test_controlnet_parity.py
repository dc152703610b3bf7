"""ControlNet parity with diffusers (the oracle) on the same tiny random weights, every comparison within 1e-4.

1. The model: lcmkit's `ControlNetModel` loaded from a diffusers-saved folder gives diffusers' residuals, and our
   UNet given those residuals gives diffusers' UNet output.
2. The pipelines: our LCM pipelines with `controlnet=` match diffusers' `StableDiffusionControlNetPipeline` and
   `StableDiffusionControlNetImg2ImgPipeline` with an `LCMScheduler`: one net, two nets with their own scales and
   start/end fractions, a control image of the wrong size (both resize it), an LCM UNet (w-embedding), and a plain
   UNet with real classifier-free guidance (the LCM-LoRA case). img2img runs at strength 1.0, where diffusers'
   SD-style step truncation and LCM's strength-in-the-scheduler give the same timesteps. diffusers' ControlNet
   img2img pipeline knows no LCM UNet (it never passes the w-embedding and runs CFG whenever guidance > 1; its
   text-to-image sibling does both right), so for the LCM UNet it runs at guidance 1 (no CFG) while a forward
   pre-hook hands its UNet the w-embedding of our guidance scale (`w_embedding_hook`).
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from helpers.reference import assert_close_to_reference, max_abs_diff
from helpers.tiny_controlnet import build_diffusers_controlnet

from lcmkit import LatentConsistencyModelImg2ImgPipeline, LatentConsistencyModelPipeline
from lcmkit.loading.controlnet import load_controlnet
from lcmkit.models.unet import UNet2DConditionModel

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
PROMPTS = ["a red circle", "a green square"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def pil(seed: int, size=(32, 32)) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Two random diffusers ControlNets and their folders."""
    out = []
    for seed in (0, 1):
        ref = build_diffusers_controlnet(seed)
        folder = tmp_path_factory.mktemp(f"controlnet{seed}")
        ref.save_pretrained(folder)
        out.append((ref, folder))
    return out


def test_controlnet_and_unet_residuals_match_diffusers(nets, tiny_folders):
    ref, folder = nets[0]
    ours = load_controlnet(folder)
    x = torch.randn(2, 4, 16, 16, generator=gen(0))
    context = torch.randn(2, 7, 32, generator=gen(1))
    cond = torch.rand(2, 3, 32, 32, generator=gen(2))
    t = torch.tensor(601)
    with torch.no_grad():
        down, mid = ours(x, t, context, cond, 0.7, return_dict=False)
        ref_down, ref_mid = ref(x, t, context, cond, 0.7, return_dict=False)
        assert len(down) == len(ref_down) == 6
        for i, (a, b) in enumerate(zip(down, ref_down, strict=True)):
            assert_close_to_reference(a, b, atol=TOL, what=f"down residual {i}")
        assert_close_to_reference(mid, ref_mid, atol=TOL, what="mid residual")
        assert float(mid.abs().max()) > 1e-2  # the random zero convolutions really give residuals

        unet_folder = tiny_folders["sd15"] / "unet"
        ref_unet = diffusers.UNet2DConditionModel.from_pretrained(unet_folder).eval()
        our_unet = UNet2DConditionModel.from_pretrained(unet_folder)
        w = torch.randn(2, 32, generator=gen(3))
        kwargs = dict(
            timestep_cond=w, down_block_additional_residuals=ref_down, mid_block_additional_residual=ref_mid
        )
        a = our_unet(x, t, context, **kwargs).sample
        b = ref_unet(x, t, context, **kwargs).sample
        assert_close_to_reference(a, b, atol=TOL, what="UNet output with residuals")
        plain = our_unet(x, t, context, timestep_cond=w).sample
        assert max_abs_diff(a, plain) > 1e-3


def _pipes(folder, nets, which, img2img=False):
    ours_cls = LatentConsistencyModelImg2ImgPipeline if img2img else LatentConsistencyModelPipeline
    ref_cls = (
        diffusers.StableDiffusionControlNetImg2ImgPipeline
        if img2img
        else diffusers.StableDiffusionControlNetPipeline
    )
    chosen = [nets[i] for i in which]
    ours = ours_cls.from_pretrained(
        folder,
        controlnet=[load_controlnet(f) for _, f in chosen]
        if len(which) > 1
        else load_controlnet(chosen[0][1]),
    )
    ref_nets = [r for r, _ in chosen]
    ref = ref_cls.from_pretrained(
        folder,
        controlnet=ref_nets if len(which) > 1 else ref_nets[0],
        safety_checker=None,
        requires_safety_checker=False,
    )
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    return ours, ref


CASES = {
    "one net, LCM UNet": dict(
        unet="sd15", which=(0,), kwargs=dict(guidance_scale=8.0, controlnet_conditioning_scale=0.8)
    ),
    "two nets, scales and start/end": dict(
        unet="sd15",
        which=(0, 1),
        kwargs=dict(
            guidance_scale=6.0,
            controlnet_conditioning_scale=[0.6, 1.3],
            control_guidance_start=[0.0, 0.25],
            control_guidance_end=[0.75, 1.0],
        ),
    ),
    "one net, plain UNet, real CFG": dict(
        unet="sd15_plain", which=(0,), kwargs=dict(guidance_scale=1.5, control_guidance_end=0.5)
    ),
    "two nets, plain UNet, real CFG": dict(
        unet="sd15_plain",
        which=(0, 1),
        kwargs=dict(guidance_scale=2.0, controlnet_conditioning_scale=[1.0, 0.5]),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_txt2img_matches_sd_controlnet_pipeline(case, nets, tiny_folders):
    spec = CASES[case]
    ours, ref = _pipes(tiny_folders[spec["unet"]], nets, spec["which"])
    images = [pil(10 + i) for i in range(len(spec["which"]))]
    control = images if len(images) > 1 else images[0]
    kwargs = dict(num_inference_steps=4, output_type="np", **spec["kwargs"])
    a = ours(PROMPTS, control_image=control, generator=[gen(5), gen(6)], **kwargs).images
    b = ref(PROMPTS, image=control, generator=[gen(5), gen(6)], **kwargs).images
    assert a.shape == (2, 32, 32, 3)
    assert_close_to_reference(a, b, atol=TOL, what=f"txt2img image ({case})")
    no_control = LatentConsistencyModelPipeline.from_pipe(ours, controlnet=None)
    c = no_control(PROMPTS, height=32, width=32, generator=[gen(5), gen(6)], **kwargs).images
    assert max_abs_diff(a, c) > 1e-3  # the ControlNet really steered


def test_nested_per_prompt_images_match_diffusers(nets, tiny_folders):
    """diffusers' nested form: one list per prompt, each with one image per net."""
    ours, ref = _pipes(tiny_folders["sd15"], nets, (0, 1))
    nested = [[pil(40), pil(41)], [pil(42), pil(43)]]
    kwargs = dict(
        num_inference_steps=2, output_type="np", guidance_scale=5.0, controlnet_conditioning_scale=[0.9, 0.6]
    )
    a = ours(PROMPTS, control_image=nested, generator=[gen(1), gen(2)], **kwargs).images
    b = ref(PROMPTS, image=nested, generator=[gen(1), gen(2)], **kwargs).images
    assert_close_to_reference(a, b, atol=TOL, what="image from nested per-prompt control images")
    swapped = ours(PROMPTS, control_image=nested[::-1], generator=[gen(1), gen(2)], **kwargs).images
    assert max_abs_diff(a, swapped) > 1e-3  # each prompt got its own images


def test_wrong_size_control_image_is_resized_as_diffusers_does(nets, tiny_folders):
    ours, ref = _pipes(tiny_folders["sd15"], nets, (0,))
    image = pil(3, size=(48, 40))  # not the output size: both resize it (Lanczos) to 32x32
    kwargs = dict(num_inference_steps=2, output_type="np", height=32, width=32, guidance_scale=8.0)
    a = ours(PROMPTS[0], image=image, generator=gen(1), **kwargs).images
    b = ref(PROMPTS[0], image=image, generator=gen(1), **kwargs).images
    assert a.shape == (1, 32, 32, 3)
    assert_close_to_reference(a, b, atol=TOL, what="image from a resized control image")
    # without height/width the output takes the control image's size (floored to the VAE cell), as in diffusers
    c = ours(PROMPTS[0], image=image, generator=gen(1), num_inference_steps=1, output_type="np").images
    assert c.shape == (1, 40, 48, 3)


def w_embedding_hook(pipe, guidance_scale: float):
    """Give a diffusers pipeline's LCM UNet the w-embedding of `guidance_scale` (as StableDiffusionControlNetPipeline
    computes it) on every call."""
    dim = pipe.unet.config.time_cond_proj_dim

    def hook(module, args, kwargs):
        batch = args[0].shape[0]
        w = torch.tensor(guidance_scale - 1).repeat(batch)
        embed = diffusers.StableDiffusionControlNetPipeline.get_guidance_scale_embedding
        kwargs["timestep_cond"] = embed(pipe, w, embedding_dim=dim).to(args[0].dtype)
        return args, kwargs

    return pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("case", ["one net, LCM UNet", "two nets, plain UNet, real CFG"])
def test_img2img_matches_sd_controlnet_img2img_pipeline(case, nets, tiny_folders):
    spec = CASES[case]
    ours, ref = _pipes(tiny_folders[spec["unet"]], nets, spec["which"], img2img=True)
    images = [pil(20 + i) for i in range(len(spec["which"]))]
    control = images if len(images) > 1 else images[0]
    init = pil(30)
    kwargs = dict(num_inference_steps=3, strength=1.0, output_type="np", **spec["kwargs"])
    ref_kwargs = kwargs
    if ref.unet.config.time_cond_proj_dim is not None:
        w_embedding_hook(ref, kwargs["guidance_scale"])
        ref_kwargs = {**kwargs, "guidance_scale": 1.0}
    a = ours(PROMPTS[0], image=init, control_image=control, generator=gen(7), **kwargs).images
    b = ref(PROMPTS[0], image=init, control_image=control, generator=gen(7), **ref_kwargs).images
    assert_close_to_reference(a, b, atol=TOL, what=f"img2img image ({case})")
