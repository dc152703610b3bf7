"""Unit tests of the LCM scheduler and its math, against numbers from the spec (no diffusers import here).

Expected values come from /work/shared/reference/lcm-spec.md section 2.2 (schedules) and 5.3 (the reference's
own full-loop sums). Comparisons against diffusers itself live in tests/parity/test_scheduler_parity.py.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from helpers.reference import assert_close_to_reference
from helpers.scheduler_configs import SD_PNDM_JSON

from lcmkit.schedulers import LCMScheduler, LCMSchedulerConfig, LCMSchedulerOutput, lcm_math
from lcmkit.schedulers.randn import randn_like_reference

BASE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.0120,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
)


def dummy_sample_deter() -> torch.Tensor:
    """The reference tests' deterministic sample: arange / 768 laid out (3, 8, 8, 4), permuted to (4, 3, 8, 8)."""
    n = 4 * 3 * 8 * 8
    return (torch.arange(n).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)


def dummy_model(x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """The reference tests' dummy model x * t / (t + 1)."""
    if isinstance(t, torch.Tensor):
        t = t.reshape(-1, *(1,) * (x.ndim - 1)).to(x.dtype)
    return x * t / (t + 1)


def full_loop(num_inference_steps: int, **config) -> torch.Tensor:
    scheduler = LCMScheduler(**{**BASE, **config})
    scheduler.set_timesteps(num_inference_steps)
    x = dummy_sample_deter()
    generator = torch.manual_seed(0)
    for t in scheduler.timesteps:
        x = scheduler.step(dummy_model(x, t), t, x, generator).prev_sample
    return x


# ----------------------------------------------------------------------------------------------
# Schedules (spec 2.2)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, [999]),
        (2, [999, 499]),
        (3, [999, 679, 339]),
        (4, [999, 759, 499, 259]),
        (8, [999, 879, 759, 639, 499, 379, 259, 139]),
        (10, list(range(999, 0, -100))),
        (25, list(range(999, 0, -40))),
        (50, list(range(999, 0, -20))),
    ],
)
def test_standard_schedules(n: int, expected: list[int]) -> None:
    """The default schedules are the ones the spec lists (linspace index selection of diffusers >= 0.24)."""
    scheduler = LCMScheduler()
    scheduler.set_timesteps(n)
    assert scheduler.timesteps.tolist() == expected
    assert scheduler.timesteps.dtype == torch.int64
    assert scheduler.num_inference_steps == n


def test_schedule_26_is_uneven_but_ends_at_39() -> None:
    """n=26 (issue #5815) no longer stops at 499: it is uneven (one gap of 20 at the top, one at 499) and ends at 39.

    Expected list taken from diffusers 0.42.1 (the spec's sketch of it lists a 519 that is not there)."""
    scheduler = LCMScheduler()
    scheduler.set_timesteps(26)
    assert scheduler.timesteps.tolist() == [999, 979, *range(939, 498, -40), *range(479, 0, -40)]


@pytest.mark.parametrize(("last", "n"), [(99, 10), (39, 25), (39, 26), (19, 50)])
def test_inference_steps_last_timestep(last: int, n: int) -> None:
    """test_inference_steps of the reference: the last timestep for each step count."""
    scheduler = LCMScheduler(**BASE)
    scheduler.set_timesteps(n)
    assert scheduler.timesteps[-1].item() == last


@pytest.mark.parametrize("T", [100, 500, 1000])
def test_first_timestep_is_T_minus_1(T: int) -> None:
    """With the default 50-step grid the schedule starts at num_train_timesteps - 1."""
    scheduler = LCMScheduler(**{**BASE, "num_train_timesteps": T})
    scheduler.set_timesteps(4)
    assert scheduler.timesteps[0].item() == T - 1


@pytest.mark.parametrize(
    ("strength", "n", "expected"),
    [
        (0.8, 1, [799]),
        (0.8, 2, [799, 399]),
        (0.8, 3, [799, 539, 279]),
        (0.8, 4, [799, 599, 399, 199]),
        (0.5, 4, [499, 379, 259, 139]),
        (0.6, 4, [599, 459, 299, 159]),
    ],
)
def test_img2img_strength_schedules(strength: float, n: int, expected: list[int]) -> None:
    """Strength shrinks the grid before picking steps (spec 2.2, img2img)."""
    scheduler = LCMScheduler()
    scheduler.set_timesteps(n, strength=strength)
    assert scheduler.timesteps.tolist() == expected


def test_original_inference_steps_argument_overrides_config() -> None:
    scheduler = LCMScheduler(original_inference_steps=50)
    scheduler.set_timesteps(4, original_inference_steps=100)
    assert scheduler.timesteps.tolist() == lcm_math.lcm_timesteps(4, 1000, 100)
    assert scheduler.timesteps.tolist() == [999, 749, 499, 249]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one"),
        ({"num_inference_steps": 4, "timesteps": [999, 499]}, "only pass one"),
        ({"num_inference_steps": 51}, "cannot be larger than `original_inference_steps`"),
        ({"num_inference_steps": 6, "strength": 0.1}, "smaller than `num_inference_steps`"),
        ({"num_inference_steps": 1, "strength": 0.0}, "smaller than `num_inference_steps`"),
        ({"num_inference_steps": 4, "original_inference_steps": 1001}, "cannot be larger"),
        ({"num_inference_steps": 0}, "positive"),
        ({"num_inference_steps": 4, "strength": 1.5}, "strength"),
        ({"timesteps": [100, 87, 50, 51, 0]}, "descending"),
        ({"timesteps": [1000]}, "must start before"),
        ({"timesteps": []}, "at least one"),
    ],
)
def test_set_timesteps_errors(kwargs: dict, match: str) -> None:
    """Bad schedules raise ValueError saying what is wrong (reference messages where the reference has one)."""
    with pytest.raises(ValueError, match=match):
        LCMScheduler().set_timesteps(**kwargs)


# ----------------------------------------------------------------------------------------------
# Custom timesteps
# ----------------------------------------------------------------------------------------------


def test_custom_timesteps_previous_timestep() -> None:
    """previous_timestep is the next element of a custom schedule, and -1 after the last one."""
    scheduler = LCMScheduler()
    custom = [100, 87, 50, 1, 0]
    scheduler.set_timesteps(timesteps=custom)
    assert scheduler.custom_timesteps
    for i, t in enumerate(custom):
        expected = -1 if i == len(custom) - 1 else custom[i + 1]
        assert int(scheduler.previous_timestep(t)) == expected


def test_previous_timestep_before_set_timesteps_is_t_minus_1() -> None:
    assert LCMScheduler().previous_timestep(10) == 9


def test_custom_timesteps_warnings(caplog: pytest.LogCaptureFixture) -> None:
    """Off-grid points (after the first), a first point != T-1 and overlong schedules only warn."""
    with caplog.at_level(logging.WARNING, logger="lcmkit"):
        LCMScheduler().set_timesteps(timesteps=[999, 759, 499, 259])
    assert not caplog.records

    with caplog.at_level(logging.WARNING, logger="lcmkit"):
        LCMScheduler().set_timesteps(timesteps=[100, 87, 50, 1, 0])
    text = caplog.text
    assert "first timestep" in text and "[87, 50, 1, 0]" in text
    caplog.clear()

    with caplog.at_level(logging.WARNING, logger="lcmkit"):
        LCMScheduler().set_timesteps(timesteps=list(range(999, 0, -10)))
    assert "exceeds" in caplog.text


def test_custom_timesteps_with_strength_keeps_reference_quirk() -> None:
    """Strength cuts custom schedules SD-style, but num_inference_steps stays the uncut length (reference
    quirk), so the last step still adds noise: prev_sample != denoised there."""
    scheduler = LCMScheduler()
    scheduler.set_timesteps(timesteps=[999, 759, 499, 259], strength=0.5)
    assert scheduler.timesteps.tolist() == [499, 259]
    assert scheduler.num_inference_steps == 4
    x = dummy_sample_deter()
    g = torch.manual_seed(0)
    for t in scheduler.timesteps:
        out = scheduler.step(dummy_model(x, t), t, x, g)
        x = out.prev_sample
    assert not torch.equal(out.prev_sample, out.denoised)


# ----------------------------------------------------------------------------------------------
# step
# ----------------------------------------------------------------------------------------------


def test_full_loop_onestep() -> None:
    """One step (t=999) is deterministic: |x| sum 18.7097, mean 0.0244 (reference test values, tol 1e-3)."""
    x = full_loop(1)
    assert abs(x.abs().sum().item() - 18.7097) < 1e-3
    assert abs(x.abs().mean().item() - 0.0244) < 1e-3


def test_full_loop_multistep() -> None:
    """Ten steps with torch.manual_seed(0): sum 197.7616, mean 0.2575 (needs the reference's exact RNG use)."""
    x = full_loop(10)
    assert abs(x.abs().sum().item() - 197.7616) < 1e-3
    assert abs(x.abs().mean().item() - 0.2575) < 1e-3


def test_one_step_consumes_no_randomness() -> None:
    """At the last step prev_sample is denoised and no noise is drawn (spec 2.4 step 7)."""
    scheduler = LCMScheduler()
    scheduler.set_timesteps(1)
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    x = dummy_sample_deter()
    out = scheduler.step(dummy_model(x, 999), 999, x, g)
    assert torch.equal(g.get_state(), state)
    assert torch.equal(out.prev_sample, out.denoised)


def test_step_tuple_and_dataclass_agree() -> None:
    outputs = []
    for return_dict in (True, False):
        scheduler = LCMScheduler()
        scheduler.set_timesteps(4)
        x = dummy_sample_deter()
        t = scheduler.timesteps[0]
        out = scheduler.step(dummy_model(x, t), t, x, torch.manual_seed(0), return_dict=return_dict)
        outputs.append(out.to_tuple() if return_dict else out)
    assert isinstance(outputs[1], tuple)
    for a, b in zip(outputs[0], outputs[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_step_output_shape_and_indexing() -> None:
    scheduler = LCMScheduler()
    scheduler.set_timesteps(2)
    x = dummy_sample_deter()
    out = scheduler.step(dummy_model(x, 999), 999, x, torch.manual_seed(0))
    assert isinstance(out, LCMSchedulerOutput)
    assert out.prev_sample.shape == x.shape and out.denoised.shape == x.shape
    assert out[0] is out.prev_sample and out["denoised"] is out.denoised
    assert scheduler.step_index == 1


def written_out_loop(timesteps: list[int], prediction_type: str, option: dict) -> torch.Tensor:
    """The LCM sampler from the paper's equations, written here without lcmkit (spec 2.4), for the BASE betas.

    x0 from the prediction (eps: (x - sqrt(1 - a) eps) / sqrt(a); v: sqrt(a) x - sqrt(1 - a) v; sample: as is),
    clipped to [-1, 1] or dynamically thresholded at the 99.5th percentile of |x0| (s clamped to [1, max]);
    denoised = c_out x0 + c_skip x with c_skip = sd^2 / ((10 t)^2 + sd^2), c_out = 10 t / sqrt((10 t)^2 + sd^2),
    sd = 0.5; then x = sqrt(a_prev) denoised + sqrt(1 - a_prev) z, except at the last step (x = denoised).
    """
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    alpha_bar = torch.cumprod(1.0 - betas, dim=0)
    x, generator = dummy_sample_deter(), torch.manual_seed(0)
    for i, t in enumerate(timesteps):
        out, a = dummy_model(x, t), alpha_bar[t]
        if prediction_type == "epsilon":
            x0 = (x - (1 - a).sqrt() * out) / a.sqrt()
        elif prediction_type == "v_prediction":
            x0 = a.sqrt() * x - (1 - a).sqrt() * out
        else:
            x0 = out
        if option.get("clip_sample"):
            x0 = x0.clamp(-1.0, 1.0)
        if option.get("thresholding"):
            flat = x0.reshape(x0.shape[0], -1)
            s = torch.quantile(flat.abs(), 0.995, dim=1).clamp(1.0, option["sample_max_value"])[:, None]
            x0 = (flat.clamp(-s, s) / s).reshape(x0.shape)
        scaled = 10.0 * t
        c_skip = 0.25 / (scaled**2 + 0.25)
        c_out = scaled / (scaled**2 + 0.25) ** 0.5
        denoised = c_out * x0 + c_skip * x
        if i == len(timesteps) - 1:
            return denoised
        a_prev = alpha_bar[timesteps[i + 1]]
        x = a_prev.sqrt() * denoised + (1 - a_prev).sqrt() * torch.randn(x.shape, generator=generator)
    raise AssertionError("no timesteps")


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize(
    "option", [{}, {"clip_sample": True}, {"thresholding": True, "sample_max_value": 2.0}]
)
def test_full_loop_matches_the_written_out_equations(prediction_type: str, option: dict) -> None:
    """Four steps of every prediction type and x0 treatment equal the sampler written out above."""
    x = full_loop(4, prediction_type=prediction_type, **option)
    expected = written_out_loop([999, 759, 499, 259], prediction_type, option)
    assert_close_to_reference(x, expected, atol=1e-5, what=f"{prediction_type} {option} after 4 steps")


def test_step_errors() -> None:
    """step before set_timesteps, an unknown prediction type, and a timestep off the schedule raise ValueError."""
    x = dummy_sample_deter()
    with pytest.raises(ValueError, match="set_timesteps"):
        LCMScheduler().step(x, 999, x)
    scheduler = LCMScheduler(prediction_type="flow")
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="must be one of"):
        scheduler.step(x, 999, x)
    scheduler = LCMScheduler()
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="not in the schedule"):
        scheduler.step(x, 998, x)


def test_begin_index_and_step_index() -> None:
    scheduler = LCMScheduler()
    scheduler.set_timesteps(4)
    assert scheduler.step_index is None and scheduler.begin_index is None
    scheduler.set_begin_index(2)
    x = dummy_sample_deter()
    scheduler.step(x, scheduler.timesteps[2], x, torch.manual_seed(0))
    assert scheduler.begin_index == 2 and scheduler.step_index == 3
    scheduler.set_timesteps(4)
    assert scheduler.step_index is None and scheduler.begin_index is None


def test_index_for_timestep_takes_second_duplicate() -> None:
    scheduler = LCMScheduler()
    assert scheduler.index_for_timestep(5, torch.tensor([9, 5, 5, 1])) == 2
    assert scheduler.index_for_timestep(9, torch.tensor([9, 5, 5, 1])) == 0


def test_simple_attributes() -> None:
    scheduler = LCMScheduler()
    assert len(scheduler) == 1000 and scheduler.order == 1 and scheduler.init_noise_sigma == 1.0
    assert scheduler.timesteps.tolist() == list(range(999, -1, -1))
    assert scheduler.num_inference_steps is None
    assert scheduler.final_alpha_cumprod.item() == 1.0
    assert LCMScheduler(set_alpha_to_one=False).final_alpha_cumprod == scheduler.alphas_cumprod[0]
    x = torch.randn(1, 4, 2, 2)
    assert scheduler.scale_model_input(x, 999) is x
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(999)
    assert (c_skip, c_out) == lcm_math.boundary_scalings(999)


def test_add_noise_and_velocity_formulas() -> None:
    """add_noise and get_velocity are sqrt(ab) x0 + sqrt(1-ab) eps and sqrt(ab) eps - sqrt(1-ab) x0, per sample."""
    scheduler = LCMScheduler()
    scheduler.set_timesteps(10)
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = torch.tensor([scheduler.timesteps[5].item(), 19])
    ab = scheduler.alphas_cumprod[t].reshape(2, 1, 1, 1)
    torch.testing.assert_close(scheduler.add_noise(x0, eps, t), ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
    torch.testing.assert_close(scheduler.get_velocity(x0, eps, t), ab.sqrt() * eps - (1 - ab).sqrt() * x0)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def test_config_defaults_and_mapping_access() -> None:
    """The config has every reference key with its default and reads like a dict and like attributes."""
    config = LCMScheduler().config
    assert isinstance(config, LCMSchedulerConfig)
    assert dict(config) == {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "timestep_scaling": 10.0,
        "rescale_betas_zero_snr": False,
    }
    assert config["original_inference_steps"] == config.original_inference_steps == 50
    assert "beta_end" in config and "skip_prk_steps" not in config
    assert config.get("nope", 3) == 3
    with pytest.raises(KeyError):
        config["nope"]
    with pytest.raises(Exception):  # noqa: B017 - frozen dataclass
        config.beta_end = 0.02  # type: ignore[misc]
    assert hash(config) == hash(LCMSchedulerConfig())


def test_constructor_accepts_config_dicts_and_rejects_unknown_keys() -> None:
    """LCMScheduler(**scheduler.config) works (private keys dropped); unknown keys raise TypeError."""
    scheduler = LCMScheduler(**{**dict(LCMScheduler(beta_end=0.02).config), "_class_name": "LCMScheduler"})
    assert scheduler.config.beta_end == 0.02
    assert LCMScheduler(LCMSchedulerConfig(), timestep_scaling=5).config.timestep_scaling == 5.0
    with pytest.raises(TypeError, match="skip_prk_steps"):
        LCMScheduler(skip_prk_steps=True)
    with pytest.raises(ValueError, match="original_inference_steps"):
        LCMScheduler(original_inference_steps="fifty")
    with pytest.raises(NotImplementedError, match="squaredcos_cap_v2"):
        LCMScheduler(beta_schedule="cosine")


def test_from_config_of_another_scheduler(caplog: pytest.LogCaptureFixture) -> None:
    """A PNDM config of Stable Diffusion loads: known keys kept (steps_offset, set_alpha_to_one), others dropped."""
    pndm = dict(SD_PNDM_JSON)
    with caplog.at_level(logging.DEBUG, logger="lcmkit"):
        scheduler = LCMScheduler.from_config(pndm, timestep_spacing="trailing")
    assert "skip_prk_steps" in caplog.text
    config = scheduler.config
    assert config.steps_offset == 1 and config.set_alpha_to_one is False
    assert config.timestep_spacing == "trailing" and config.original_inference_steps == 50
    assert LCMScheduler.from_config(scheduler.config).config == config
    # keys listed in `_use_default_values` fall back to our defaults (diffusers does the same)
    assert (
        LCMScheduler.from_config({"beta_end": 0.02, "_use_default_values": ["beta_end"]}).config.beta_end
        == 0.012
    )


def test_save_and_load_round_trip(tmp_path) -> None:
    """save_pretrained writes scheduler_config.json with _class_name LCMScheduler; from_pretrained reads it back
    and the loaded scheduler steps identically."""
    betas = torch.linspace(0.0001, 0.02, 1000).tolist()
    scheduler = LCMScheduler(trained_betas=betas, steps_offset=1, timestep_spacing="trailing")
    scheduler.save_pretrained(tmp_path / "scheduler")
    data = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert data["_class_name"] == "LCMScheduler" and len(data["trained_betas"]) == 1000
    loaded = LCMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert loaded.config == scheduler.config
    assert torch.equal(loaded.alphas_cumprod, scheduler.alphas_cumprod)
    with pytest.raises(FileNotFoundError):
        LCMScheduler.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------
# lcm_math
# ----------------------------------------------------------------------------------------------


def test_boundary_scalings_values_floats_and_tensors() -> None:
    """c_skip/c_out at t=999 and t=19 (spec 2.3), on python floats and on a batch of timesteps."""
    c_skip, c_out = lcm_math.boundary_scalings(999)
    assert abs(c_skip - 2.5e-9) < 1e-10 and abs(c_out - (1 - 1.3e-9)) < 1e-10
    c_skip, c_out = lcm_math.boundary_scalings(19)
    assert abs(c_skip - 6.9e-6) < 1e-7 and abs(c_out - 0.9999965) < 1e-7
    assert lcm_math.boundary_scalings(0) == (1.0, 0.0)
    t = torch.tensor([0, 19, 999])
    c_skip_t, c_out_t = lcm_math.boundary_scalings(t)
    assert c_skip_t.shape == (3,) and c_skip_t[0] == 1.0 and c_out_t[0] == 0.0
    for i, ti in enumerate(t.tolist()):
        cs, co = lcm_math.boundary_scalings(float(ti))
        assert math.isclose(c_skip_t[i].item(), cs, rel_tol=1e-6, abs_tol=1e-12)
        assert math.isclose(c_out_t[i].item(), co, rel_tol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_x0_and_eps_from_prediction_invert_the_forward_process(prediction_type: str) -> None:
    """Given the exact model output for (x0, eps), both helpers recover x0 and eps (float64, per-sample alpha_bar)."""
    g = torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64),
        torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64),
    )
    alpha_bar = torch.tensor([0.9, 0.5, 0.01], dtype=torch.float64).reshape(3, 1, 1, 1)
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    output = {
        "epsilon": eps,
        "sample": x0,
        "v_prediction": alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0,
    }[prediction_type]
    torch.testing.assert_close(lcm_math.x0_from_prediction(output, x_t, alpha_bar, prediction_type), x0)
    torch.testing.assert_close(lcm_math.eps_from_prediction(output, x_t, alpha_bar, prediction_type), eps)
    # a python float alpha_bar works too
    x0_f = lcm_math.x0_from_prediction(output[:1].float(), x_t[:1].float(), 0.9, prediction_type)
    torch.testing.assert_close(x0_f, x0[:1].float(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="must be one of"):
        lcm_math.x0_from_prediction(output, x_t, alpha_bar, "flow")


def test_guidance_scale_embedding_layout() -> None:
    """w*1000, sin first then cos, (half-1) divisor, one zero column for odd dims (spec 1.6)."""
    w = torch.tensor([7.5, 0.0])
    emb = lcm_math.guidance_scale_embedding(w, embedding_dim=8)
    assert emb.shape == (2, 8) and emb.dtype == torch.float32
    freqs = torch.exp(-torch.arange(4) * math.log(10000.0) / 3)
    torch.testing.assert_close(emb[0, :4], torch.sin(7500.0 * freqs), atol=1e-3, rtol=0)
    torch.testing.assert_close(emb[0, 4:], torch.cos(7500.0 * freqs), atol=1e-3, rtol=0)
    torch.testing.assert_close(emb[1], torch.tensor([0.0] * 4 + [1.0] * 4))
    odd = lcm_math.guidance_scale_embedding(w, embedding_dim=9)
    assert odd.shape == (2, 9) and torch.equal(odd[:, :8], emb) and (odd[:, 8] == 0).all()
    assert lcm_math.guidance_scale_embedding(w, 8, dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="1-D"):
        lcm_math.guidance_scale_embedding(w[:, None], 8)


def test_dynamic_threshold() -> None:
    """Samples within [-1, 1] are unchanged; a sample with a large quantile is clamped to [-s, s] then divided by s."""
    x = torch.linspace(-0.9, 0.9, 2 * 3 * 4).reshape(2, 3, 4)
    assert torch.equal(lcm_math.dynamic_threshold(x), x)
    big = torch.full((1, 1, 10), 3.0)
    out = lcm_math.dynamic_threshold(big, ratio=0.5, max_value=2.0)
    torch.testing.assert_close(out, torch.ones_like(big))
    assert lcm_math.dynamic_threshold(big.half(), 0.5, 2.0).dtype == torch.float16


def test_beta_schedules() -> None:
    """scaled_linear is linear in sqrt(beta); cosine betas are capped at 0.999; zero-SNR rescale ends at alpha_bar 0."""
    b = lcm_math.make_betas("scaled_linear", 1000, 0.00085, 0.012)
    assert b.dtype == torch.float32 and b.shape == (1000,)
    torch.testing.assert_close(b[0], torch.tensor(0.00085))
    torch.testing.assert_close(b[-1], torch.tensor(0.012))
    lin = lcm_math.make_betas("linear", 10, 0.1, 1.0)
    torch.testing.assert_close(lin, torch.linspace(0.1, 1.0, 10))
    cos = lcm_math.make_betas("squaredcos_cap_v2", 1000)
    assert cos.max().item() == pytest.approx(0.999) and cos.min().item() > 0
    rescaled = lcm_math.rescale_zero_terminal_snr(b)
    alpha_bar = torch.cumprod(1 - rescaled, 0)
    assert alpha_bar[-1].item() == pytest.approx(0.0, abs=1e-10)
    torch.testing.assert_close(alpha_bar[0], torch.cumprod(1 - b, 0)[0])
    trained = lcm_math.make_betas("ignored", trained_betas=[0.1, 0.2])
    assert trained.tolist() == pytest.approx([0.1, 0.2])


# ----------------------------------------------------------------------------------------------
# randn
# ----------------------------------------------------------------------------------------------


def test_randn_generator_list_draws_per_sample() -> None:
    """A list of generators draws one (1, ...) slice each; a one-element list is the single generator."""
    shape = (3, 2, 4, 4)
    out = randn_like_reference(
        shape, [torch.Generator().manual_seed(s) for s in (1, 2, 3)], dtype=torch.float32
    )
    for i, s in enumerate((1, 2, 3)):
        assert torch.equal(
            out[i : i + 1], torch.randn((1, 2, 4, 4), generator=torch.Generator().manual_seed(s))
        )
    single = randn_like_reference(shape, torch.Generator().manual_seed(5))
    assert torch.equal(single, randn_like_reference(shape, [torch.Generator().manual_seed(5)]))
    assert torch.equal(single, torch.randn(shape, generator=torch.Generator().manual_seed(5)))
    assert randn_like_reference(shape, None, "cpu", torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="one generator per batch element"):
        randn_like_reference(shape, [torch.Generator(), torch.Generator()])
