"""Parity with diffusers on a CUDA GPU: the same tiny folders, both pipelines moved to the GPU.

CI has no GPU, so this module is skipped there (the reason says so); it is run by hand on a GPU machine:
`python -m pytest tests/parity/test_cuda_parity.py`. fp32 runs with TF32 off (cuDNN allows it by default, and
our sub-pixel upsampling does different TF32 roundings than the reference's upsample-then-conv), so the
tolerance is the CPU suite's 1e-4; fp16 gets 1e-2 (half-precision rounding through different kernel orders).
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from helpers.reference import assert_close_to_reference

from lcmkit.runtime import FastPaths

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (run by hand on a GPU machine)"
)

TOL = {torch.float32: 1e-4, torch.float16: 1e-2}
PROMPT = "a red circle on a blue background"


@pytest.fixture(autouse=True)
def no_tf32():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def load_pair(folder, dtype, img2img=False):
    import diffusers

    import lcmkit

    if img2img:
        ours_cls, ref_cls = (
            lcmkit.LatentConsistencyModelImg2ImgPipeline,
            diffusers.LatentConsistencyModelImg2ImgPipeline,
        )
    else:
        ours_cls, ref_cls = lcmkit.LatentConsistencyModelPipeline, diffusers.LatentConsistencyModelPipeline
    ours = ours_cls.from_pretrained(folder, torch_dtype=dtype).to("cuda")
    ref = ref_cls.from_pretrained(folder, torch_dtype=dtype).to("cuda")
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
    return ours, ref


def run_both(ours, ref, generator_device="cpu", **kwargs):
    images = []
    for pipe in (ours, ref):
        gen = torch.Generator(generator_device).manual_seed(0)
        images.append(
            np.asarray(pipe(PROMPT, generator=gen, output_type="np", **kwargs).images, dtype=np.float64)
        )
    return images


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", ["sd15", "sd2"])
def test_text2img_on_cuda(tiny_folders, name, dtype):
    ours, ref = load_pair(tiny_folders[name], dtype)
    assert ours.device.type == "cuda" and ours.dtype == dtype
    a, b = run_both(ours, ref, num_inference_steps=4, guidance_scale=6.0)
    assert_close_to_reference(a, b, atol=TOL[dtype], what="image")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_channels_last_vae_on_cuda(tiny_folders, dtype):
    """lcmkit's VAE forced channels-last on the GPU (on the CPU "auto" does it) still matches diffusers."""
    ours, ref = load_pair(tiny_folders["sd15"], dtype)
    # channels-last everywhere leaves no level for the (CPU-only) Winograd path, which must then be off
    ours.set_fast_paths(FastPaths(vae_memory_format="channels_last", conv_winograd="off"))
    a, b = run_both(ours, ref, num_inference_steps=2, guidance_scale=6.0)
    assert_close_to_reference(a, b, atol=TOL[dtype], what="image")


def test_cuda_generator_draws_on_the_gpu(tiny_folders):
    """A CUDA generator draws the noise on the GPU, as diffusers does: same numbers, same image."""
    ours, ref = load_pair(tiny_folders["sd15"], torch.float32)
    a, b = run_both(ours, ref, generator_device="cuda", num_inference_steps=2, guidance_scale=6.0)
    assert_close_to_reference(a, b, atol=TOL[torch.float32], what="image")
    cpu_gen = torch.Generator("cpu").manual_seed(0)
    cpu_a = ours(
        PROMPT, generator=cpu_gen, output_type="np", num_inference_steps=2, guidance_scale=6.0
    ).images
    assert np.abs(a - cpu_a).max() > 1e-3  # really a different draw, not a silent fallback to the CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_img2img_on_cuda(tiny_folders, dtype):
    ours, ref = load_pair(tiny_folders["sd15"], dtype, img2img=True)
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    a, b = run_both(ours, ref, image=image, strength=0.6, num_inference_steps=4, guidance_scale=6.0)
    assert_close_to_reference(a, b, atol=TOL[dtype], what="image")


def test_switches_on_cuda(tiny_folders):
    """FreeU, VAE slicing and latent output on the GPU, each against diffusers with the same switch."""
    ours, ref = load_pair(tiny_folders["sd15"], torch.float32)
    for pipe in (ours, ref):
        pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
        pipe.vae.enable_slicing()
    a, b = run_both(ours, ref, num_inference_steps=2, guidance_scale=6.0, num_images_per_prompt=2)
    assert_close_to_reference(a, b, atol=TOL[torch.float32], what="image")
    lat = []
    for pipe in (ours, ref):
        gen = torch.Generator("cpu").manual_seed(0)
        lat.append(pipe(PROMPT, generator=gen, output_type="latent", num_inference_steps=2).images)
    assert lat[0].device.type == "cuda"
    assert float((lat[0] - lat[1]).abs().max()) <= TOL[torch.float32]
