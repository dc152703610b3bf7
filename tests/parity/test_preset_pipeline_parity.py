"""Presets and the few-step schedulers through the LCM text-to-image pipeline, against diffusers.

On tiny random SD1.5-layout weights (no w-embedding, as under a LoRA), our pipeline with `preset=` (or with
`pipe.scheduler = TCDScheduler.from_config(...)`) matches diffusers' StableDiffusionPipeline with the scheduler
and settings the preset names (<= 1e-4 on the images): TCD (gamma 0.3 and 1.0), DDIM trailing (Hyper-SD), DDIM
trailing without alpha-to-one (PCM) and LCM on fixed timesteps (DMD2-style).
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from lcmkit import LatentConsistencyModelPipeline
from lcmkit.schedulers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler, TCDScheduler

TOL = 1e-4
PROMPTS = ["a red circle on a blue background", "a yellow square"]


def _gens(seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def pair(tiny_folders):
    folder = tiny_folders["sd15_plain"]
    ours = LatentConsistencyModelPipeline.from_pretrained(folder)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False
    )
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    return ours, ref


def _ref_images(ref, scheduler, **kwargs) -> np.ndarray:
    original = ref.scheduler
    ref.scheduler = scheduler
    try:
        return ref(PROMPTS, generator=_gens(7), output_type="np", **kwargs).images
    finally:
        ref.scheduler = original


@pytest.fixture
def fresh(pair):
    ours, ref = pair
    base = ours.scheduler
    yield ours, ref
    ours.scheduler = base


CASES = {
    "tcd": (diffusers.TCDScheduler, {}, {"num_inference_steps": 4, "guidance_scale": 0.0, "eta": 0.3}),
    "hyper-sd-1step": (
        diffusers.TCDScheduler,
        {},
        {"num_inference_steps": 1, "guidance_scale": 0.0, "eta": 1.0},
    ),
    "hyper-sd-4step": (
        diffusers.DDIMScheduler,
        {"timestep_spacing": "trailing"},
        {"num_inference_steps": 4, "guidance_scale": 0.0},
    ),
    "hyper-sd-8step-cfg": (
        diffusers.DDIMScheduler,
        {"timestep_spacing": "trailing"},
        {"num_inference_steps": 8, "guidance_scale": 5.0},
    ),
    "pcm-2step": (
        diffusers.DDIMScheduler,
        {"timestep_spacing": "trailing", "clip_sample": False, "set_alpha_to_one": False},
        {"num_inference_steps": 2, "guidance_scale": 1.0},
    ),
    "dmd2": (diffusers.LCMScheduler, {}, {"timesteps": [999, 749, 499, 249], "guidance_scale": 0.0}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_preset_matches_diffusers(fresh, name: str) -> None:
    ours, ref = fresh
    ref_cls, overrides, kwargs = CASES[name]
    a = ours(PROMPTS, preset=name, generator=_gens(7), output_type="np").images
    b = _ref_images(ref, ref_cls.from_config(ref.scheduler.config, **overrides), **kwargs)
    assert np.abs(a - b).max() <= TOL


def test_scheduler_swap_as_in_diffusers(fresh) -> None:
    ours, ref = fresh
    ours.scheduler = TCDScheduler.from_config(ours.scheduler.config)
    a = ours(PROMPTS, num_inference_steps=2, guidance_scale=1.0, generator=_gens(3), output_type="np").images
    ref.scheduler, base = diffusers.TCDScheduler.from_config(ref.scheduler.config), ref.scheduler
    try:
        b = ref(
            PROMPTS, num_inference_steps=2, guidance_scale=1.0, eta=0.3, generator=_gens(3), output_type="np"
        )
    finally:
        ref.scheduler = base
    assert np.abs(a - b.images).max() <= TOL


@pytest.mark.parametrize("set_kwargs", [{"num_inference_steps": 3}, {"timesteps": [999, 749, 499, 249]}])
def test_euler_trailing_in_the_pipeline(fresh, set_kwargs: dict) -> None:
    """Euler needs the input scaled by 1 / sqrt(sigma^2 + 1) and noise of std init_noise_sigma: the pipeline
    asks the scheduler for both, so it matches diffusers with real CFG too."""
    ours, ref = fresh
    ours.scheduler = EulerDiscreteScheduler.from_config(ours.scheduler.config, timestep_spacing="trailing")
    kwargs = {**set_kwargs, "guidance_scale": 2.0, "output_type": "np"}
    a = ours(PROMPTS, generator=_gens(5), **kwargs).images
    base = ref.scheduler
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(base.config, timestep_spacing="trailing")
    try:
        b = ref(PROMPTS, generator=_gens(5), **kwargs).images
    finally:
        ref.scheduler = base
    assert np.abs(a - b).max() <= TOL


def test_preset_sets_the_scheduler_and_explicit_values_win(fresh) -> None:
    ours, _ = fresh
    ours(PROMPTS[0], preset="pcm-4step", num_inference_steps=3, output_type="latent")
    assert isinstance(ours.scheduler, DDIMScheduler)
    assert ours.scheduler.config.timestep_spacing == "trailing" and not ours.scheduler.config.set_alpha_to_one
    assert ours.scheduler.num_inference_steps == 3
    ours(PROMPTS[0], preset="lcm-lora", output_type="latent")
    assert type(ours.scheduler) is LCMScheduler and ours.scheduler.num_inference_steps == 4


def test_unknown_preset_is_refused_naming_the_known_ones(fresh) -> None:
    ours, _ = fresh
    with pytest.raises(ValueError, match=r"unknown preset 'fast'; known presets: lcm, lcm-lora, tcd"):
        ours(PROMPTS[0], preset="fast", output_type="latent")
