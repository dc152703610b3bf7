"""Unit tests of the few-step schedulers' own rules (parity with diffusers is in tests/parity)."""

from __future__ import annotations

import pytest
import torch

from lcmkit.schedulers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler, TCDScheduler
from lcmkit.schedulers.ddim import spaced_timesteps


def test_trailing_spacing_ends_at_the_last_training_step() -> None:
    assert spaced_timesteps("trailing", 4, 1000).tolist() == [999, 749, 499, 249]
    assert spaced_timesteps("trailing", 1, 1000).tolist() == [999]
    with pytest.raises(ValueError, match="timestep_spacing 'karras' is not supported"):
        spaced_timesteps("karras", 4, 1000)


def test_tcd_is_an_lcm_scheduler_with_its_own_step() -> None:
    tcd = TCDScheduler.from_config(LCMScheduler().config)
    assert isinstance(tcd, LCMScheduler) and tcd.gamma == 0.3
    tcd.set_timesteps(4)
    assert tcd.timesteps.tolist() == [999, 759, 499, 259]


@pytest.mark.parametrize("gamma", [-0.1, 1.5])
def test_tcd_refuses_gamma_outside_0_1(gamma: float) -> None:
    tcd = TCDScheduler()
    tcd.set_timesteps(2)
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"gamma \(`eta`\) must be in \[0, 1\]"):
        tcd.step(x, tcd.timesteps[0], x, eta=gamma)


def test_tcd_gamma_zero_draws_no_noise_and_the_attribute_is_the_default() -> None:
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    tcd = TCDScheduler()
    tcd.set_timesteps(2)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    deterministic = tcd.step(out, tcd.timesteps[0], x, eta=0.0, generator=g)
    assert torch.equal(g.get_state(), state)
    assert torch.equal(deterministic.prev_sample, deterministic.denoised)
    tcd.set_timesteps(2)
    tcd.gamma = 0.0
    assert torch.equal(tcd.step(out, tcd.timesteps[0], x).prev_sample, deterministic.prev_sample)
    tcd.set_timesteps(2)
    tcd.gamma = 0.5
    stochastic = tcd.step(out, tcd.timesteps[0], x, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(stochastic.prev_sample, deterministic.prev_sample)


def test_tcd_last_step_returns_the_trajectory_point() -> None:
    tcd = TCDScheduler()
    tcd.set_timesteps(1)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = tcd.step(torch.zeros_like(x), tcd.timesteps[0], x, eta=1.0)
    assert torch.equal(out.prev_sample, out.pred_noised_sample)


def test_euler_needs_input_scaling_and_larger_initial_noise() -> None:
    euler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing"
    )
    euler.set_timesteps(4)
    assert euler.timesteps.tolist() == [999.0, 749.0, 499.0, 249.0]
    assert float(euler.init_noise_sigma) > 10 and float(euler.sigmas[-1]) == 0.0
    x = torch.ones(1, 4, 2, 2)
    scaled = euler.scale_model_input(x, euler.timesteps[0])
    assert torch.allclose(scaled, x / (euler.sigmas[0] ** 2 + 1) ** 0.5)


@pytest.mark.parametrize("timesteps", [[], [500, 700], [1000, 500], [999, 500, -1]])
def test_euler_refuses_bad_custom_timesteps(timesteps: list[int]) -> None:
    with pytest.raises(ValueError, match="strictly descending"):
        EulerDiscreteScheduler().set_timesteps(timesteps=timesteps)


def test_euler_refuses_sigma_variants_by_name() -> None:
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        EulerDiscreteScheduler.from_config({"use_karras_sigmas": True})
    with pytest.raises(ValueError, match="interpolation_type='log_linear' is not supported"):
        EulerDiscreteScheduler(interpolation_type="log_linear")


def test_ddim_in_a_pipeline_loop_takes_a_generator_and_refuses_img2img() -> None:
    ddim = DDIMScheduler.from_config({}, timestep_spacing="trailing", clip_sample=False)
    ddim.set_timesteps(2, original_inference_steps=50)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prev, x0 = ddim.step(
        torch.zeros_like(x), ddim.timesteps[-1], x, generator=torch.Generator(), return_dict=False
    )
    assert torch.equal(prev, x0)  # alpha-to-one: the last step lands on x0
    with pytest.raises(ValueError, match="text-to-image only"):
        ddim.set_timesteps(2, strength=0.5)


def test_euler_in_a_pipeline_loop_refuses_img2img() -> None:
    euler = EulerDiscreteScheduler(timestep_spacing="trailing")
    euler.set_timesteps(2, original_inference_steps=50)
    assert euler.timesteps.tolist() == [999.0, 499.0]
    with pytest.raises(ValueError, match="text-to-image only"):
        euler.set_timesteps(2, strength=0.8)
