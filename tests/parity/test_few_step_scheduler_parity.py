"""Parity of the few-step schedulers with their diffusers (0.42) namesakes on the same configs and inputs.

- `TCDScheduler`: timesteps identical (or both raise) over step counts, original steps, strengths and custom
  lists; `step` outputs within 1e-6 for every prediction type and gamma, with the same seeded noise.
- `EulerDiscreteScheduler`: timesteps, sigmas, init_noise_sigma, scale_model_input and step outputs within 1e-6
  for every spacing ("trailing" included) and custom timesteps lists, with zero-SNR rescaling.
- A full multi-step loop with a fixed fake model output per step gives the same final sample (1e-6).
"""

from __future__ import annotations

import diffusers
import pytest
import torch

from lcmkit.schedulers import EulerDiscreteScheduler, TCDScheduler

ATOL = 1e-6
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def _timesteps_or_error(scheduler, **kwargs):
    try:
        scheduler.set_timesteps(**kwargs)
    except ValueError:
        return ValueError
    return scheduler.timesteps.tolist(), scheduler.num_inference_steps


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 50, 51])
@pytest.mark.parametrize("original", [None, 50, 100])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_tcd_timesteps_match(steps: int, original: int | None, strength: float) -> None:
    kwargs = {"num_inference_steps": steps, "original_inference_steps": original, "strength": strength}
    ours = _timesteps_or_error(TCDScheduler(**SD_BETAS), **kwargs)
    ref = _timesteps_or_error(diffusers.TCDScheduler(**SD_BETAS), **kwargs)
    assert ours == ref


@pytest.mark.parametrize("original", [None, 50])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_tcd_custom_timesteps_match(original: int | None, strength: float) -> None:
    custom = [999, 899, 699, 499, 299, 100]
    kwargs = {"timesteps": custom, "original_inference_steps": original, "strength": strength}
    assert _timesteps_or_error(TCDScheduler(), **kwargs) == _timesteps_or_error(
        diffusers.TCDScheduler(), **kwargs
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_tcd_loop_matches(prediction_type: str, gamma: float) -> None:
    config = {**SD_BETAS, "prediction_type": prediction_type}
    ours, ref = TCDScheduler(**config), diffusers.TCDScheduler(**config)
    ours.set_timesteps(4)
    ref.set_timesteps(4)
    x_ours = x_ref = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    g_ours, g_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for i, t in enumerate(ref.timesteps):
        out = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(10 + i))
        a = ours.step(out, t, x_ours, eta=gamma, generator=g_ours)
        b = ref.step(out, t, x_ref, eta=gamma, generator=g_ref)
        _close(a.prev_sample, b.prev_sample)
        _close(a.pred_noised_sample, b.pred_noised_sample)
        x_ours, x_ref = a.prev_sample, b.prev_sample
    _close(a.denoised, b.prev_sample)  # what our pipeline decodes is diffusers' final latent


def test_tcd_default_gamma_is_diffusers_default_eta() -> None:
    ours, ref = TCDScheduler(), diffusers.TCDScheduler()
    ours.set_timesteps(2)
    ref.set_timesteps(2)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    a = ours.step(out, ours.timesteps[0], x, generator=torch.Generator().manual_seed(2), return_dict=False)
    b = ref.step(out, ref.timesteps[0], x, generator=torch.Generator().manual_seed(2), return_dict=False)
    _close(a[0], b[0])


def test_tcd_config_round_trips(tmp_path) -> None:
    TCDScheduler(beta_schedule="linear", original_inference_steps=25).save_pretrained(tmp_path)
    ref = diffusers.TCDScheduler.from_pretrained(tmp_path)
    assert ref.config.beta_schedule == "linear" and ref.config.original_inference_steps == 25
    ref.save_pretrained(tmp_path / "back")
    assert TCDScheduler.from_pretrained(tmp_path / "back").config.original_inference_steps == 25


EULER_CONFIGS = {
    "trailing_sd": {**SD_BETAS, "timestep_spacing": "trailing"},
    "leading_offset": {**SD_BETAS, "timestep_spacing": "leading", "steps_offset": 1},
    "linspace_default": {},
    "trailing_v_zero_snr": {
        **SD_BETAS,
        "timestep_spacing": "trailing",
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
    },
    "trailing_sample_sigma_min": {
        "timestep_spacing": "trailing",
        "prediction_type": "sample",
        "final_sigmas_type": "sigma_min",
    },
}


def _euler_loop(scheduler, set_kwargs: dict) -> list[tuple[torch.Tensor, ...]]:
    scheduler.set_timesteps(**set_kwargs)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    seen = [
        (scheduler.timesteps.clone(), scheduler.sigmas.clone(), torch.as_tensor(scheduler.init_noise_sigma))
    ]
    for i, t in enumerate(scheduler.timesteps):
        scaled = scheduler.scale_model_input(x, t)
        out = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(10 + i))
        x, x0 = scheduler.step(out, t, x, return_dict=False)
        seen.append((scaled, x, x0))
    return seen


@pytest.mark.parametrize("name", sorted(EULER_CONFIGS))
@pytest.mark.parametrize(
    "set_kwargs",
    [
        {"num_inference_steps": 1},
        {"num_inference_steps": 4},
        {"num_inference_steps": 7},
        {"timesteps": [999, 749, 499, 249]},
    ],
    ids=["n1", "n4", "n7", "custom"],
)
def test_euler_matches(name: str, set_kwargs: dict) -> None:
    config = EULER_CONFIGS[name]
    ours = _euler_loop(EulerDiscreteScheduler.from_config(config), set_kwargs)
    ref = _euler_loop(diffusers.EulerDiscreteScheduler(**config), set_kwargs)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref, strict=True):
        for x, y in zip(a, b, strict=True):
            _close(x.float(), y.float())


def test_euler_from_diffusers_config_refuses_karras() -> None:
    config = dict(diffusers.EulerDiscreteScheduler(use_karras_sigmas=True).config)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        EulerDiscreteScheduler.from_config(config)
    plain = EulerDiscreteScheduler.from_config(
        dict(diffusers.EulerDiscreteScheduler(timestep_spacing="trailing").config)
    )
    assert plain.config.timestep_spacing == "trailing"
