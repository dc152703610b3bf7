"""The whole recipe (VAE -> teacher -> distillation) end to end on a minute architecture, two steps per stage.

It proves the stages connect and their folders are what they claim to be: the teacher is a Stable Diffusion
folder with a DDPM scheduler whose betas are `make_betas`' (diffusers loads it), the result is a complete LCM
folder with a w-embedding UNet and an LCMScheduler on the distillation grid that both lcmkit and diffusers load
and that generates the same image in both; timings, loss logs and samples are written; a resumed run skips
finished stages.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers.tiny_models import MINUTE_UNET, MINUTE_VAE

from lcmkit.schedulers.lcm_math import make_betas
from lcmkit.train.recipe import RecipeConfig, StagePlan, run_recipe, ship, ship_tiny_vae
from lcmkit.train.teacher import Architecture, TextEncoderSpec

MINUTE = Architecture(
    image_size=16,
    vae=MINUTE_VAE,
    unet=MINUTE_UNET,
    text=TextEncoderSpec(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32),
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe")
    cfg = RecipeConfig(
        out=out,
        architecture=MINUTE,
        vae=StagePlan(2, 4, 1e-3),
        teacher=StagePlan(2, 4, 1e-3),
        distill=StagePlan(2, 2, 1e-4),
        tiny_vae=StagePlan(2, 2, 1e-3),
        tiny_vae_channels=4,
        tiny_vae_sampler_pool=8,
        text_pretrain_steps=2,
        noise_offset=0.1,
        num_ddim_timesteps=25,
        checkpoint_every=1,
        log_every=1,
        num_workers=0,
        progress=False,
        sample_captions=("a small red circle in the center on a blue background",),
    )
    return cfg, run_recipe(cfg)


def test_stages_write_their_records(run):
    cfg, times = run
    out = cfg.out
    assert json.loads((out / "times.json").read_text()) == times
    for stage in ("vae", "teacher", "distill", "tiny-vae"):
        assert times[stage]["seconds"] > 0 and times[stage]["steps"] == 2 and not times[stage]["skipped"]
        log = out / "work" / stage / f"{stage.replace('-', '_')}_loss"
        rows = log.with_suffix(".csv").read_text().splitlines()
        assert len(rows) == 3 and all(np.isfinite(float(r.split(",")[1])) for r in rows[1:])
        assert log.with_suffix(".png").is_file()
    assert (out / "samples.png").is_file()
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 0.18215 and vae_config["scaling_factor"] > 0
    for stage in ("teacher", "distill"):  # the recipe's offset noise reaches both forward processes
        assert json.loads((out / "work" / stage / f"{stage}_config.json").read_text())["noise_offset"] == 0.1


def test_teacher_folder_is_stable_diffusion_with_ddpm_schedule(run):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    cfg, _ = run
    teacher = StableDiffusionPipeline.from_pretrained(cfg.out / "teacher", safety_checker=None)
    assert isinstance(teacher.scheduler, DDPMScheduler)
    assert teacher.scheduler.config.prediction_type == "epsilon"
    assert torch.equal(teacher.scheduler.betas, make_betas("scaled_linear", 1000, 0.00085, 0.012))
    assert teacher.unet.config.time_cond_proj_dim is None
    assert teacher.tokenizer.model_max_length == teacher.text_encoder.config.max_position_embeddings == 32


def test_lcm_folder_loads_in_lcmkit_and_diffusers_alike(run):
    import diffusers

    from lcmkit import LatentConsistencyModelPipeline

    cfg, _ = run
    ours = LatentConsistencyModelPipeline.from_pretrained(cfg.out / "lcm")
    theirs = diffusers.LatentConsistencyModelPipeline.from_pretrained(cfg.out / "lcm", safety_checker=None)
    assert isinstance(theirs.scheduler, diffusers.LCMScheduler)
    assert theirs.scheduler.config.original_inference_steps == 25
    assert theirs.unet.config.time_cond_proj_dim == 256
    assert ours.unet.config.time_cond_proj_dim == 256
    assert (cfg.out / "lcm" / "unet_target" / "config.json").is_file()
    kwargs = {"num_inference_steps": 2, "guidance_scale": 4.0, "output_type": "np"}
    a = ours("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = theirs("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_resume_skips_finished_stages(run):
    cfg, first = run
    first = json.loads(json.dumps(first))  # a snapshot: the resumed run must not rewrite history
    times = run_recipe(dataclasses.replace(cfg, resume=True))
    for stage in ("vae", "teacher", "distill", "tiny-vae"):
        assert times[stage]["skipped"]
        assert times[stage]["seconds"] == first[stage]["seconds"]  # the record of the run that did the work
    assert json.loads((cfg.out / "times.json").read_text()) == times


def test_ship_copies_only_what_the_pipeline_loads(run, tmp_path):
    """`ship` leaves training extras behind, gives a folder that loads, and never replaces one unasked."""
    from lcmkit import LatentConsistencyModelPipeline

    cfg, _ = run
    dest = ship(cfg.out / "lcm", tmp_path / "tiny-lcm")
    assert sorted(p.name for p in dest.iterdir()) == [
        "model_index.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
        "vae",
    ]
    LatentConsistencyModelPipeline.from_pretrained(dest)
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists"):
        ship(cfg.out / "lcm", dest)
    assert (dest / "keep.txt").read_text() == "mine"
    ship(cfg.out / "lcm", dest, overwrite=True)
    assert not (dest / "keep.txt").exists() and (dest / "unet" / "config.json").is_file()
    with pytest.raises(ValueError, match="model_index.json"):
        ship(tmp_path, tmp_path / "other")


def test_tiny_vae_stage_imitates_the_vae_and_ships(run, tmp_path):
    """The tiny-vae stage writes an AutoencoderTiny folder at the VAE's pixels-per-latent factor that decodes the
    VAE's scaled latents to images of the right size; `ship_tiny_vae` copies it without replacing a folder unasked."""
    from lcmkit.models.tiny_vae import AutoencoderTiny
    from lcmkit.models.vae import AutoencoderKL

    cfg, _ = run
    tiny = AutoencoderTiny.from_pretrained(cfg.out / "tiny-vae")
    vae = AutoencoderKL.from_pretrained(cfg.out / "vae")
    assert tiny.config.decoder_scale == vae.vae_scale_factor == tiny.config.encoder_scale
    assert tiny.config.scaling_factor >= 1.0  # fitted so the latents fit TAESD's input clamp
    latents = torch.randn(1, vae.config.latent_channels, 4, 4)
    assert tiny.decode(latents).sample.shape == (1, 3, 4 * vae.vae_scale_factor, 4 * vae.vae_scale_factor)
    rows = (cfg.out / "work" / "tiny-vae" / "tiny_vae_loss.csv").read_text().splitlines()
    assert rows[0].split(",")[:2] == ["step", "loss"] and len(rows) == 3
    dest = ship_tiny_vae(cfg.out / "tiny-vae", tmp_path / "taesd")
    assert (dest / "config.json").is_file()
    with pytest.raises(ValueError, match="exists"):
        ship_tiny_vae(cfg.out / "tiny-vae", dest)
    with pytest.raises(ValueError, match="config.json"):
        ship_tiny_vae(tmp_path / "nothing", tmp_path / "other")
