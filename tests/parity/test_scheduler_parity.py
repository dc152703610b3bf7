"""Parity of lcmkit's LCMScheduler with diffusers' `LCMScheduler` (0.42.1), the reference, on the same configs.

What is proven here, and with which tolerance:
- timesteps are identical (and both raise ValueError together) over the grid of step counts, original steps
  and strengths, and for custom schedules (with strength), including the uncut `num_inference_steps` quirk;
- betas / alphas_cumprod are bit-identical for every beta schedule, zero-SNR rescaling and trained betas;
- `step` gives the same prev_sample and denoised (atol 1e-6, rtol 0; in practice bit-identical) for every
  prediction type, clipping and thresholding, int and tensor timesteps, fp32 and fp16, with one seeded
  generator or a list of them: so the noise is drawn exactly like diffusers' `randn_tensor`;
- add_noise and get_velocity are bit-identical;
- config files travel both ways (our save -> diffusers load, diffusers save -> our load), and `from_config`
  of PNDM / DDIM / Euler configs keeps the same fields as diffusers does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import diffusers
import pytest
import torch
from helpers.reference import assert_close_to_reference
from helpers.scheduler_configs import SD_PNDM_JSON

from lcmkit.schedulers import LCMScheduler, LCMSchedulerConfig

FIELDS = list(LCMSchedulerConfig())
ATOL = 1e-6


def _timesteps_or_error(scheduler, **kwargs) -> tuple | type[ValueError]:
    try:
        scheduler.set_timesteps(**kwargs)
    except ValueError:
        return ValueError
    return scheduler.timesteps.tolist(), scheduler.num_inference_steps


def _known_fields(config) -> dict:
    out = {k: config[k] for k in FIELDS}
    if out["trained_betas"] is not None:
        out["trained_betas"] = [float(b) for b in out["trained_betas"]]
    return out


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _warnings_of(logger_name: str) -> Iterator[list[logging.LogRecord]]:
    handler = _Records()
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


# ----------------------------------------------------------------------------------------------
# Timesteps
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("original_steps", [50, 100])
def test_timesteps_grid_matches_reference(original_steps: int) -> None:
    """n = 1..8 x strength 0.1..1.0: same timesteps and num_inference_steps, or ValueError from both."""
    mismatches = []
    for n in range(1, 9):
        for strength in [i / 10 for i in range(1, 11)]:
            kwargs = dict(num_inference_steps=n, original_inference_steps=original_steps, strength=strength)
            ref = _timesteps_or_error(diffusers.LCMScheduler(), **kwargs)
            ours = _timesteps_or_error(LCMScheduler(), **kwargs)
            if ref != ours:
                mismatches.append((kwargs, ref, ours))
    assert not mismatches


@pytest.mark.parametrize("n", [10, 25, 26, 49, 50])
def test_long_schedules_match_reference(n: int) -> None:
    kwargs = dict(num_inference_steps=n)
    assert _timesteps_or_error(LCMScheduler(), **kwargs) == _timesteps_or_error(
        diffusers.LCMScheduler(), **kwargs
    )


@pytest.mark.parametrize(
    "custom",
    [
        [999, 759, 499, 259],
        [100, 87, 50, 1, 0],
        [999, 500, 20],
        [899, 699, 499, 299, 99],
        list(range(999, 0, -10)),
    ],
)
@pytest.mark.parametrize("strength", [1.0, 0.8, 0.5, 0.3, 0.1])
def test_custom_timesteps_match_reference(custom: list[int], strength: float) -> None:
    """Custom schedules: same cut for strength, same (uncut) num_inference_steps, same number of warnings."""
    with _warnings_of("diffusers.schedulers.scheduling_lcm") as ref_warnings:
        ref = _timesteps_or_error(diffusers.LCMScheduler(), timesteps=custom, strength=strength)
    with _warnings_of("lcmkit.schedulers") as our_warnings:
        ours = _timesteps_or_error(LCMScheduler(), timesteps=custom, strength=strength)
    assert ours == ref
    assert len(our_warnings) == len(ref_warnings)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timesteps": [100, 87, 50, 51, 0]},
        {"timesteps": [1000]},
        {"timesteps": [999, 499], "num_inference_steps": 2},
        {},
        {"num_inference_steps": 4, "original_inference_steps": 1001},
    ],
)
def test_invalid_schedules_raise_like_reference(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        diffusers.LCMScheduler().set_timesteps(**kwargs)
    with pytest.raises(ValueError):
        LCMScheduler().set_timesteps(**kwargs)


# ----------------------------------------------------------------------------------------------
# Noise schedules
# ----------------------------------------------------------------------------------------------

CONFIGS = [
    {},
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"rescale_betas_zero_snr": True},
    {"beta_schedule": "linear", "rescale_betas_zero_snr": True, "num_train_timesteps": 500},
    {"trained_betas": torch.linspace(0.0002, 0.03, 1000).tolist()},
    {"set_alpha_to_one": False},
    {"num_train_timesteps": 100, "beta_start": 0.001, "beta_end": 0.02},
    {"beta_schedule": "linear", "beta_start": 0.1, "beta_end": 2.0},
]


@pytest.mark.parametrize("config", CONFIGS)
def test_noise_schedule_matches_reference(config: dict) -> None:
    """betas, alphas_cumprod and final_alpha_cumprod are bit-identical (NaNs in the same places)."""
    ref, ours = diffusers.LCMScheduler(**config), LCMScheduler(**config)
    torch.testing.assert_close(ours.betas, ref.betas, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(
        ours.final_alpha_cumprod, ref.final_alpha_cumprod, atol=0, rtol=0, equal_nan=True
    )
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert len(ours) == len(ref)


def test_unknown_beta_schedule_raises_like_reference() -> None:
    with pytest.raises(NotImplementedError):
        diffusers.LCMScheduler(beta_schedule="cosine")
    with pytest.raises(NotImplementedError):
        LCMScheduler(beta_schedule="cosine")


# ----------------------------------------------------------------------------------------------
# step
# ----------------------------------------------------------------------------------------------


def _model(x: torch.Tensor, t: torch.Tensor | int, fixed: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the UNet that depends on x and t."""
    return torch.tanh(x) * (int(t) / 1000) + fixed


def _run_both(
    config: dict,
    schedule: dict,
    *,
    generator_kind: str = "single",
    int_timesteps: bool = False,
    dtype: torch.dtype = torch.float32,
    batch: int = 2,
    exact: bool = False,
) -> None:
    """Run the same sampling loop with both schedulers, comparing prev_sample and denoised at every step."""
    ref, ours = diffusers.LCMScheduler(**config), LCMScheduler(**config)
    ref.set_timesteps(**schedule)
    ours.set_timesteps(**schedule)
    assert torch.equal(ref.timesteps, ours.timesteps)

    def make_generator():
        if generator_kind == "list":
            return [torch.Generator().manual_seed(10 + i) for i in range(batch)]
        if generator_kind == "none":
            return None
        return torch.Generator().manual_seed(0)

    g_ref, g_ours = make_generator(), make_generator()
    init = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 8, 8, generator=init).to(dtype)
    fixed = torch.randn(batch, 4, 8, 8, generator=init).to(dtype)
    x_ref, x_ours = x.clone(), x.clone()
    for t in ref.timesteps:
        t_arg = int(t) if int_timesteps else t
        if generator_kind == "none":
            torch.manual_seed(123)
        r = ref.step(_model(x_ref, t, fixed), t_arg, x_ref, generator=g_ref, return_dict=False)
        if generator_kind == "none":
            torch.manual_seed(123)
        o = ours.step(_model(x_ours, t, fixed), t_arg, x_ours, generator=g_ours, return_dict=False)
        for a, b in zip(o, r, strict=True):
            assert a.dtype == b.dtype
            assert_close_to_reference(a, b, atol=ATOL)
            if exact:
                assert torch.equal(a, b)
        x_ref, x_ours = r[0], o[0]
    assert ours.step_index == ref.step_index


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize(
    "mode",
    [
        {},
        {"clip_sample": True},
        {"clip_sample": True, "clip_sample_range": 0.5},
        {"thresholding": True, "sample_max_value": 0.5},
        {"thresholding": True, "sample_max_value": 2.0},
        # a large max lets the quantile itself set the threshold, so the ratio matters
        {"thresholding": True, "sample_max_value": 50.0, "dynamic_thresholding_ratio": 0.9},
    ],
)
@pytest.mark.parametrize("generator_kind", ["single", "list"])
def test_step_matches_reference(prediction_type: str, mode: dict, generator_kind: str) -> None:
    _run_both(
        {"prediction_type": prediction_type, **mode},
        {"num_inference_steps": 4},
        generator_kind=generator_kind,
    )


@pytest.mark.parametrize(
    "schedule",
    [
        {"num_inference_steps": 1},
        {"num_inference_steps": 3, "strength": 0.5},
        {"num_inference_steps": 8, "original_inference_steps": 100},
        {"timesteps": [999, 499, 99]},
        {"timesteps": [999, 759, 499, 259], "strength": 0.5},
    ],
)
def test_step_schedules_match_reference(schedule: dict) -> None:
    """Incl. custom + strength, where both keep adding noise at the last step."""
    _run_both({}, schedule)


@pytest.mark.parametrize(
    "config",
    [{"timestep_scaling": 1.0}, {"rescale_betas_zero_snr": True}, {"beta_schedule": "squaredcos_cap_v2"}],
)
def test_step_configs_match_reference(config: dict) -> None:
    _run_both({**config, "prediction_type": "v_prediction"}, {"num_inference_steps": 4})


@pytest.mark.parametrize("int_timesteps", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_step_timestep_types_and_dtypes_match_reference(int_timesteps: bool, dtype: torch.dtype) -> None:
    """Python-int timesteps give float64 c_skip/c_out, tensor timesteps float32 ones: both paths match,
    bit for bit (the same torch ops in the same order; in fp16 a 1e-6 tolerance would demand that anyway)."""
    _run_both({}, {"num_inference_steps": 4}, int_timesteps=int_timesteps, dtype=dtype, exact=True)


def test_step_without_generator_uses_global_rng_like_reference() -> None:
    _run_both({}, {"num_inference_steps": 4}, generator_kind="none")


def test_step_with_begin_index_matches_reference() -> None:
    """A pipeline may set begin_index; the first step then starts there instead of searching the timestep."""
    ref, ours = diffusers.LCMScheduler(), LCMScheduler()
    for s in (ref, ours):
        s.set_timesteps(4)
        s.set_begin_index(1)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    r = ref.step(x, ref.timesteps[1], x, torch.Generator().manual_seed(0))
    o = ours.step(x, ours.timesteps[1], x, torch.Generator().manual_seed(0))
    assert_close_to_reference(o.prev_sample, r.prev_sample, atol=ATOL)
    assert_close_to_reference(o.denoised, r.denoised, atol=ATOL)
    assert ours.step_index == ref.step_index == 2


def test_scalings_and_previous_timestep_match_reference() -> None:
    ref, ours = diffusers.LCMScheduler(timestep_scaling=7.0), LCMScheduler(timestep_scaling=7.0)
    for t in (0, 19, 259, 999, torch.tensor(499), torch.tensor([19, 999])):
        r = ref.get_scalings_for_boundary_condition_discrete(t)
        o = ours.get_scalings_for_boundary_condition_discrete(t)
        for a, b in zip(o, r, strict=True):
            assert type(a) is type(b)
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b)
            else:
                assert a == b
    assert ours.previous_timestep(500) == ref.previous_timestep(500)
    for s in (ref, ours):
        s.set_timesteps(timesteps=[100, 87, 50, 1, 0])
    for t in [100, 87, 50, 1, 0]:
        assert int(ours.previous_timestep(t)) == int(ref.previous_timestep(t))


# ----------------------------------------------------------------------------------------------
# add_noise / get_velocity
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", [{}, {"rescale_betas_zero_snr": True}])
def test_add_noise_and_velocity_match_reference(dtype: torch.dtype, config: dict) -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=g).to(dtype)
    eps = torch.randn(4, 4, 8, 8, generator=g).to(dtype)
    t = torch.tensor([999, 500, 19, 0])
    ref, ours = diffusers.LCMScheduler(**config), LCMScheduler(**config)
    assert torch.equal(ours.add_noise(x0, eps, t), ref.add_noise(x0, eps, t))
    assert torch.equal(ours.get_velocity(x0, eps, t), ref.get_velocity(x0, eps, t))
    one = torch.tensor(259)
    assert torch.equal(ours.add_noise(x0, eps, one), ref.add_noise(x0, eps, one))


# ----------------------------------------------------------------------------------------------
# Config files and from_config
# ----------------------------------------------------------------------------------------------

SAVE_CONFIGS = [
    {},
    {
        "trained_betas": torch.linspace(0.0002, 0.03, 1000).tolist(),
        "steps_offset": 1,
        "set_alpha_to_one": False,
        "timestep_spacing": "trailing",
        "timestep_scaling": 5.0,
        "original_inference_steps": 100,
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "thresholding": True,
        "sample_max_value": 2.0,
    },
]


@pytest.mark.parametrize("config", SAVE_CONFIGS)
def test_our_saved_config_loads_in_diffusers(tmp_path, config: dict) -> None:
    ours = LCMScheduler(**config)
    ours.save_pretrained(tmp_path)
    ref = diffusers.LCMScheduler.from_pretrained(tmp_path)
    assert _known_fields(ref.config) == _known_fields(ours.config)
    assert ref.config["_class_name"] == "LCMScheduler"
    assert torch.equal(ref.alphas_cumprod, ours.alphas_cumprod)
    # and a plain dict of our config goes into diffusers' from_config
    assert _known_fields(diffusers.LCMScheduler.from_config(ours.config.to_dict()).config) == _known_fields(
        ours.config
    )


@pytest.mark.parametrize("config", SAVE_CONFIGS)
def test_diffusers_saved_config_loads_in_ours(tmp_path, config: dict) -> None:
    ref = diffusers.LCMScheduler(**config)
    ref.save_pretrained(tmp_path / "scheduler")
    ours = LCMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert _known_fields(ours.config) == _known_fields(ref.config)
    assert torch.equal(ref.alphas_cumprod, ours.alphas_cumprod)
    ours_direct = LCMScheduler.from_config(ref.config)
    assert ours_direct.config == ours.config


def _foreign_configs() -> list[tuple[str, dict]]:
    return [
        ("sd_pndm_json", SD_PNDM_JSON),
        (
            "pndm_object",
            dict(
                diffusers.PNDMScheduler(
                    beta_schedule="scaled_linear",
                    beta_start=0.00085,
                    beta_end=0.012,
                    steps_offset=1,
                    skip_prk_steps=True,
                    set_alpha_to_one=False,
                ).config
            ),
        ),
        ("pndm_defaults", dict(diffusers.PNDMScheduler().config)),
        (
            "ddim_v",
            dict(
                diffusers.DDIMScheduler(
                    prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"
                ).config
            ),
        ),
        (
            "euler",
            dict(diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", steps_offset=1).config),
        ),
    ]


@pytest.mark.parametrize("index", range(5))
@pytest.mark.parametrize("overrides", [{}, {"original_inference_steps": 100, "timestep_spacing": "trailing"}])
def test_from_config_of_other_schedulers_matches_reference(index: int, overrides: dict) -> None:
    """Known fields kept, unknown ones dropped, `_use_default_values` honoured, overrides applied, as diffusers."""
    _, config = _foreign_configs()[index]
    ref = diffusers.LCMScheduler.from_config(config, **overrides)
    ours = LCMScheduler.from_config(config, **overrides)
    assert _known_fields(ours.config) == _known_fields(ref.config)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert ours.final_alpha_cumprod == ref.final_alpha_cumprod
