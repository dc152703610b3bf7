"""Parity of lcmkit's `DDIMScheduler` / `sample_ddim` with diffusers' `DDIMScheduler` (0.42.1), eta = 0.

What is proven here, and with which tolerance:
- `set_timesteps` gives identical timesteps for leading (with steps_offset), trailing and linspace spacing,
  over step counts that do and do not divide T (1, 2, 3, 4, 7, 8, 50, 1000);
- `step` gives the same prev_sample and pred_original_sample (atol 1e-6) at every timestep of a schedule, for
  epsilon / v_prediction / sample prediction, clip_sample on and off, thresholding, set_alpha_to_one on and off,
  every beta schedule, zero-SNR rescaling, from a DDPM teacher's config dict;
- `sample_ddim` runs the same guided loop as a hand-written diffusers loop (the Stable Diffusion pipeline's
  eps_u + g (eps_c - eps_u) over [uncond, cond] batches) with a deterministic stand-in model (atol 1e-5).
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from helpers.reference import assert_close_to_reference

from lcmkit.schedulers.ddim import DDIMScheduler, DDIMSchedulerConfig, sample_ddim
from lcmkit.train.teacher import ddpm_scheduler_config

ATOL = 1e-6

CONFIGS = {
    "defaults": {},
    "sd_leading": {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "clip_sample": False,
        "steps_offset": 1,
        "set_alpha_to_one": False,
    },
    "trailing_v_zero_snr": {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "timestep_spacing": "trailing",
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "clip_sample": False,
    },
    "linspace_sample_clip": {
        "beta_schedule": "squaredcos_cap_v2",
        "timestep_spacing": "linspace",
        "prediction_type": "sample",
        "clip_sample": True,
        "clip_sample_range": 0.5,
    },
    "thresholding": {"thresholding": True, "sample_max_value": 1.5, "clip_sample": False},
    "short_T": {"num_train_timesteps": 100, "timestep_spacing": "trailing"},
}


def _pair(config: dict) -> tuple[DDIMScheduler, diffusers.DDIMScheduler]:
    return DDIMScheduler.from_config(config), diffusers.DDIMScheduler.from_config(config)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 8, 50])
def test_timesteps_match(name: str, steps: int) -> None:
    ours, ref = _pair(CONFIGS[name])
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert ours.timesteps.dtype == ref.timesteps.dtype == torch.int64
    assert ours.timesteps.tolist() == ref.timesteps.tolist()


def test_all_timesteps_and_schedules_match() -> None:
    ours, ref = _pair({"timestep_spacing": "linspace"})
    ours.set_timesteps(1000)
    ref.set_timesteps(1000)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    for name in CONFIGS:
        ours, ref = _pair(CONFIGS[name])
        torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, atol=0, rtol=0)
        torch.testing.assert_close(ours.final_alpha_cumprod, ref.final_alpha_cumprod, atol=0, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_step_matches(name: str, steps: int) -> None:
    ours, ref = _pair(CONFIGS[name])
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    generator = torch.Generator().manual_seed(steps)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    for t in ref.timesteps:
        model_output = torch.randn(x.shape, generator=generator) * 2  # large enough to hit the clipping
        expected = ref.step(model_output, t, x, eta=0.0)
        got = ours.step(model_output, t, x)
        assert_close_to_reference(got.prev_sample, expected.prev_sample, atol=ATOL)
        assert_close_to_reference(got.pred_original_sample, expected.pred_original_sample, atol=ATOL)
        x = expected.prev_sample


def test_teacher_ddpm_config_loads_like_diffusers() -> None:
    """The teacher folder's DDPMScheduler dict becomes the same DDIM sampler in both libraries."""
    config = ddpm_scheduler_config()
    ours, ref = _pair(config)
    for key in DDIMSchedulerConfig().to_dict():
        assert getattr(ours.config, key) == ref.config[key], key
    ours.set_timesteps(4)
    ref.set_timesteps(4)
    assert ours.timesteps.tolist() == ref.timesteps.tolist() == [751, 501, 251, 1]


def test_errors() -> None:
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDIMScheduler(timestep_spacing="karras")
    with pytest.raises(ValueError, match="no config keys"):
        DDIMScheduler.from_config({}, eta=1.0)
    scheduler = DDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(torch.zeros(1), 10, torch.zeros(1))
    with pytest.raises(ValueError, match="between 1 and"):
        scheduler.set_timesteps(1001)


class _StandIn(torch.nn.Module):
    """A deterministic "UNet": output depends on the sample, the timestep and the context, like a real one."""

    def forward(self, x, t, context, return_dict=True):
        out = torch.tanh(x * 0.7 + context.mean(dim=(1, 2))[:, None, None, None]) * (1 + t.float() / 1000)
        return (out,)


@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
@pytest.mark.parametrize("steps", [1, 4])
def test_sample_ddim_matches_diffusers_loop(guidance_scale: float, steps: int) -> None:
    config = ddpm_scheduler_config(timestep_spacing="trailing")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=generator)
    cond = torch.randn(3, 5, 16, generator=generator)
    uncond = torch.randn(1, 5, 16, generator=generator)
    model = _StandIn()

    got = sample_ddim(model, DDIMScheduler.from_config(config), cond, uncond, guidance_scale, steps, latents)

    ref = diffusers.DDIMScheduler.from_config(config)
    ref.set_timesteps(steps)
    x = latents.clone()
    context = torch.cat([uncond.expand(3, -1, -1), cond])
    for t in ref.timesteps:
        if guidance_scale > 1:
            eps_u, eps_c = model(torch.cat([x, x]), t, context)[0].chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        else:
            eps = model(x, t, cond)[0]
        x = ref.step(eps, t, x, eta=0.0).prev_sample
    assert_close_to_reference(got, x, atol=1e-5)
