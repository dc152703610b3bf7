"""Pipeline folders in and out: our saved folders load in diffusers with the same images; fp16 variants, `.bin`
weights, `torch_dtype`, a safety checker inside the pipeline, and scheduler swaps, each against diffusers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.reference import assert_close_to_reference, max_abs_diff

from lcmkit import LatentConsistencyModelImg2ImgPipeline, LatentConsistencyModelPipeline, LCMScheduler

TOL = 1e-4
BF16_TOL = 2e-2
PROMPT = "a blue triangle at the bottom right"


def run(pipe, seed=0, **kw):
    pipe.set_progress_bar_config(disable=True)
    kw.setdefault("num_inference_steps", 2)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="np", **kw)


def test_saved_folder_loads_in_diffusers_with_same_images(tiny_folders, tmp_path):
    import diffusers

    ours = LatentConsistencyModelPipeline.from_pretrained(tiny_folders["sd2"])
    ours.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "LatentConsistencyModelPipeline"
    assert index["safety_checker"] == [None, None]
    ref = diffusers.LatentConsistencyModelPipeline.from_pretrained(tmp_path / "saved")
    assert isinstance(ref.scheduler, diffusers.LCMScheduler)
    assert ref.scheduler.config.prediction_type == "v_prediction"
    assert_close_to_reference(run(ours).images, run(ref).images, atol=TOL, what="image")
    again = LatentConsistencyModelPipeline.from_pretrained(tmp_path / "saved")
    assert max_abs_diff(run(again).images, run(ours).images) == 0.0


def test_fp16_variant_and_torch_dtype(tiny_folders, tmp_path):
    """A folder saved by diffusers with variant="fp16" loads with `variant="fp16"`; `torch_dtype` casts."""
    import diffusers

    ref = diffusers.LatentConsistencyModelPipeline.from_pretrained(
        tiny_folders["sd15"], torch_dtype=torch.float16
    )
    ref.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    ours = LatentConsistencyModelPipeline.from_pretrained(
        tmp_path / "fp16", variant="fp16", torch_dtype=torch.float32
    )
    assert ours.unet.dtype == torch.float32 and ours.vae.dtype == torch.float32
    assert ours.text_encoder.dtype == torch.float32
    ref32 = diffusers.LatentConsistencyModelPipeline.from_pretrained(
        tmp_path / "fp16", variant="fp16", torch_dtype=torch.float32
    )
    assert_close_to_reference(run(ours).images, run(ref32).images, atol=TOL, what="image")
    with pytest.raises(ValueError, match="no weights file"):
        LatentConsistencyModelPipeline.from_pretrained(tmp_path / "fp16")
    bf16 = LatentConsistencyModelPipeline.from_pretrained(tiny_folders["sd15"], torch_dtype=torch.bfloat16)
    assert bf16.unet.dtype == torch.bfloat16 and bf16.vae.dtype == torch.bfloat16
    ref16 = diffusers.LatentConsistencyModelPipeline.from_pretrained(
        tiny_folders["sd15"], torch_dtype=torch.bfloat16
    )
    # both run in bfloat16 (8-bit mantissa), with their own op order: 2e-2 on [0, 1] images
    assert_close_to_reference(run(bf16).images, run(ref16).images, atol=BF16_TOL, what="bfloat16 image")


def test_variant_missing_falls_back_to_default_weights(tmp_path, tiny_folders, caplog):
    """Like diffusers: a model folder without fp16 files for a component loads that component's default weights."""
    import shutil

    folder = tmp_path / "mixed"
    shutil.copytree(tiny_folders["sd15"], folder)
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet_file.rename(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    with caplog.at_level("WARNING"):
        pipe = LatentConsistencyModelPipeline.from_pretrained(folder, variant="fp16")
    assert any("has no 'fp16' weights" in r.getMessage() for r in caplog.records)
    assert pipe.vae is not None


def test_bin_weights_load_with_weights_only(tiny_folders, tmp_path):
    import diffusers

    ref = diffusers.LatentConsistencyModelPipeline.from_pretrained(tiny_folders["sd15"])
    ref.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "unet" / "diffusion_pytorch_model.bin").is_file()
    assert not list((tmp_path / "bin" / "unet").glob("*.safetensors"))
    ours = LatentConsistencyModelPipeline.from_pretrained(tmp_path / "bin")
    assert_close_to_reference(run(ours).images, run(ref).images, atol=TOL, what="image")


def test_component_override_and_scheduler_from_config(tiny_folders):
    """The LCM-LoRA idiom: build an LCMScheduler from another scheduler's config dict."""
    from diffusers import PNDMScheduler

    pndm = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    sched = LCMScheduler.from_config(pndm.config)
    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny_folders["sd15"], scheduler=sched)
    assert pipe.scheduler is sched
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    assert run(pipe).images.shape == (1, 32, 32, 3)
    i2i = LatentConsistencyModelImg2ImgPipeline.from_pipe(pipe)
    assert i2i.unet is pipe.unet
    assert set(pipe.components) == {
        "vae",
        "text_encoder",
        "tokenizer",
        "unet",
        "scheduler",
        "safety_checker",
        "feature_extractor",
        "image_encoder",
    }


def test_to_dtype_moves_every_model(tiny_folders):
    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny_folders["sd15"])
    pipe.to(torch.float64)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float64}
    assert pipe.to("cpu", torch.float32) is pipe
    assert pipe.unet.dtype == torch.float32


def _tiny_safety_parts(flag_everything: bool):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from helpers.tiny_models import tiny_safety_clip_config
    from transformers import CLIPImageProcessor

    config = tiny_safety_clip_config()
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        # cosine similarity is at least -1, so a threshold of -2 flags every image; +2 flags none
        checker.concept_embeds_weights.fill_(-2.0 if flag_everything else 2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    extractor = CLIPImageProcessor(crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32})
    return checker, extractor


@pytest.mark.parametrize("flag_everything", [True, False])
def test_safety_checker_in_pipeline_matches_diffusers(tiny_folders, tmp_path, flag_everything):
    import diffusers

    checker, extractor = _tiny_safety_parts(flag_everything)
    ref = diffusers.LatentConsistencyModelPipeline.from_pretrained(
        tiny_folders["sd15"],
        safety_checker=checker,
        feature_extractor=extractor,
        requires_safety_checker=True,
    )
    ref.save_pretrained(tmp_path / "with_checker")
    ours = LatentConsistencyModelPipeline.from_pretrained(tmp_path / "with_checker")
    assert ours.safety_checker is not None and ours.feature_extractor is not None
    a = run(ours, num_images_per_prompt=2)
    b = run(ref, num_images_per_prompt=2)
    assert a.nsfw_content_detected == b.nsfw_content_detected == [flag_everything] * 2
    assert_close_to_reference(a.images, b.images, atol=TOL, what="image")
    if flag_everything:
        assert np.abs(a.images).max() == 0.0, "flagged images must be black"
    # disabling the checker by override
    off = LatentConsistencyModelPipeline.from_pretrained(tmp_path / "with_checker", safety_checker=None)
    assert run(off).nsfw_content_detected is None
