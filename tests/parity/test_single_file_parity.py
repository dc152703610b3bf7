"""Single-file parity: an original-layout SD 1.x checkpoint loaded by lcmkit gives diffusers' images.

The file is written in the test from tiny seeded diffusers / transformers modules through the hand-written inverse
mapping in `helpers/original_layout.py` (independent of lcmkit). The UNet has SD 1.5's shape in miniature: four
levels, two resnets each, cross-attention on the first three, 8 heads, 32 GroupNorm groups; the VAE has three levels
with two resnets each; the text tower has CLIP's 49408-token vocabulary, so lcmkit's packaged tokenizer drives it.

Oracle 1: diffusers' LatentConsistencyModelPipeline built from the original modules; images must agree to 1e-4.
Oracle 2: diffusers' own `from_single_file(path, config=<local folder>)`, offline. Its converter drops LCM's
`time_embedding.cond_proj` (the LCM file then fails there with "Cannot copy out of meta tensor"), so that oracle
reads the same tiny model without the w-embedding input; it must load exactly our weights.
"""

from __future__ import annotations

import pytest
import torch
from helpers.original_layout import original_state_dict, save_original
from helpers.reference import assert_close_to_reference
from helpers.tiny_models import DIFFUSERS_SD1_MINIATURE_UNET, DIFFUSERS_SD1_MINIATURE_VAE

TOL = 1e-4
PROMPT = "An astronaut riding a horse on Mars, 4k, highly detailed!!"
SIZE = 64  # pixels: latents 16x16 through the 3-level VAE


def build_modules(lcm: bool = True) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**DIFFUSERS_SD1_MINIATURE_UNET, "time_cond_proj_dim": 32 if lcm else None})
    torch.manual_seed(1)
    vae = AutoencoderKL(**DIFFUSERS_SD1_MINIATURE_VAE, latent_channels=4, sample_size=SIZE)
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=1,  # CLIP's 64-wide heads
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=64,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    )
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval()}


def reference_pipeline(modules: dict, tokenizer, cls_name: str = "LatentConsistencyModelPipeline"):
    import diffusers

    scheduler = diffusers.LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = getattr(diffusers, cls_name)(
        **modules,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def lcm_file(tmp_path_factory):
    modules = build_modules(lcm=True)
    path = save_original(
        original_state_dict(**modules), tmp_path_factory.mktemp("sf") / "tiny_lcm.safetensors"
    )
    return modules, path


@pytest.fixture(scope="module")
def loaded(lcm_file):
    """lcmkit's text2img pipeline from the LCM file, loaded once for the tests that only read it."""
    from lcmkit import LatentConsistencyModelPipeline

    return LatentConsistencyModelPipeline.from_single_file(lcm_file[1])


def run(pipe, seed: int = 0, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    kwargs.setdefault("num_inference_steps", 2)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


def assert_same_weights(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    a, b = ours.state_dict(), ref.state_dict()
    assert set(a) == set(b)
    bad = [k for k in b if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ: {bad[:4]}"


def test_text2img_matches_diffusers(lcm_file, loaded):
    """lcmkit's from_single_file gives diffusers' text2img images (<= 1e-4) and exactly the original weights."""
    modules, ours = lcm_file[0], loaded
    for name, module in modules.items():
        assert_same_weights(getattr(ours, name), module)
    ref = reference_pipeline(modules, ours.tokenizer)
    for seed, guidance in ((0, 8.5), (3, 2.0)):
        a = run(ours, seed, height=SIZE, width=SIZE, guidance_scale=guidance)
        b = run(ref, seed, height=SIZE, width=SIZE, guidance_scale=guidance)
        assert a.shape == (1, SIZE, SIZE, 3)
        assert_close_to_reference(a, b, atol=TOL, what="image")


def test_img2img_matches_diffusers(lcm_file):
    """The img2img pipeline's from_single_file matches diffusers' img2img on the same weights (<= 1e-4)."""
    from lcmkit import LatentConsistencyModelImg2ImgPipeline

    modules, path = lcm_file
    ours = LatentConsistencyModelImg2ImgPipeline.from_single_file(path)
    ref = reference_pipeline(modules, ours.tokenizer, "LatentConsistencyModelImg2ImgPipeline")
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    a = run(ours, 1, image=image, strength=0.6, num_inference_steps=3)
    b = run(ref, 1, image=image, strength=0.6, num_inference_steps=3)
    assert_close_to_reference(a, b, atol=TOL, what="image")


def test_save_pretrained_loads_in_diffusers(loaded, tmp_path):
    """After from_single_file, save_pretrained writes a diffusers folder that diffusers loads, with the same images."""
    import diffusers

    ours = loaded
    ours.save_pretrained(tmp_path / "saved")
    ref = diffusers.LatentConsistencyModelPipeline.from_pretrained(tmp_path / "saved", local_files_only=True)
    assert ref.unet.config.time_cond_proj_dim == 32
    assert ref.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert_close_to_reference(
        run(ours, height=SIZE, width=SIZE), run(ref, height=SIZE, width=SIZE), atol=TOL, what="image"
    )


def test_diffusers_from_single_file_reads_the_same_weights(tmp_path):
    """Oracle 2: diffusers' own converter, offline with `config=` a local folder, reads our test file into exactly
    the original modules (so the test's inverse mapping is the real layout), and lcmkit reads the same weights."""
    import diffusers

    from lcmkit import LatentConsistencyModelPipeline
    from lcmkit.loading.single_file import load_packaged_tokenizer

    modules = build_modules(lcm=False)
    path = save_original(original_state_dict(**modules), tmp_path / "tiny_sd.safetensors")
    reference_pipeline(modules, load_packaged_tokenizer()).save_pretrained(tmp_path / "config")
    theirs = diffusers.LatentConsistencyModelPipeline.from_single_file(
        str(path), config=str(tmp_path / "config"), local_files_only=True
    )
    ours = LatentConsistencyModelPipeline.from_single_file(path)
    for name, module in modules.items():
        assert_same_weights(getattr(theirs, name), module)
        assert_same_weights(getattr(ours, name), module)
    assert ours.unet.config.time_cond_proj_dim is None
