"""`LCMScheduler`: the multistep latent consistency sampler, with the diffusers scheduler contract.

Each step maps x_t to the consistency estimate `denoised` = c_out * x0 + c_skip * x_t (LCM paper eq. 6),
then, except at the last step, re-noises it to the next timestep of the schedule:
x_prev = sqrt(alpha_bar_prev) * denoised + sqrt(1 - alpha_bar_prev) * z (LCM paper Algorithm 1).
The math lives in `lcm_math`; this object only holds the schedule and the step counter.

The behaviour, errors, warnings, RNG use and config keys match diffusers 0.42 `LCMScheduler`, so that a
diffusers user can swap the import and `scheduler_config.json` files travel both ways.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lcmkit.config import read_config_json, require_settings
from lcmkit.io.errors import ModelFileError, one_line
from lcmkit.schedulers.counter import StepCounter
from lcmkit.schedulers.lcm_math import (
    boundary_scalings,
    custom_lcm_timesteps,
    dynamic_threshold,
    lcm_timesteps,
    make_betas,
    rescale_zero_terminal_snr,
    x0_from_prediction,
)
from lcmkit.schedulers.randn import randn_like_reference

logger = logging.getLogger(__name__)

CONFIG_NAME = "scheduler_config.json"
# The diffusers release whose `scheduler_config.json` layout we write (diffusers ignores the value on load).
DIFFUSERS_FORMAT_VERSION = "0.42.1"


@dataclass(frozen=True)
class LCMSchedulerConfig(Mapping):
    """Every config key of diffusers' `LCMScheduler`, with its defaults.

    `steps_offset`, `timestep_spacing` and (in practice) `set_alpha_to_one` do nothing here; they are kept
    so that Stable Diffusion scheduler configs load and saved files round-trip. The object also reads as a
    mapping (`config["beta_end"]`, `dict(config)`), because user code passes `scheduler.config` around.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    original_inference_steps: int = 50
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    timestep_scaling: float = 10.0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "trained_betas":
                if value is not None:
                    value = tuple(float(b) for b in np.asarray(value, dtype=np.float64).reshape(-1))
            else:
                value = _coerce(f.name, value, type(f.default))
            object.__setattr__(self, f.name, value)
        if self.num_train_timesteps < 1:
            raise ValueError(
                f"`num_train_timesteps` must be a positive integer, got {self.num_train_timesteps}."
            )

    def __getitem__(self, key: str) -> Any:
        if key not in _FIELD_NAMES:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_FIELD_NAMES)

    def __len__(self) -> int:
        return len(_FIELD_NAMES)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (`trained_betas` as a list), e.g. for `diffusers.LCMScheduler.from_config`."""
        d = {name: getattr(self, name) for name in _FIELD_NAMES}
        if d["trained_betas"] is not None:
            d["trained_betas"] = list(d["trained_betas"])
        return d


_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LCMSchedulerConfig))


def _coerce(name: str, value: Any, kind: type) -> Any:
    """Normalise JSON numbers (10 -> 10.0 for float fields, 50.0 -> 50 for int fields); reject wrong types."""
    if kind is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
    elif kind is int:
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ValueError(f"LCMScheduler config `{name}` must be a {kind.__name__}, got {value!r}.")


@dataclass
class LCMSchedulerOutput:
    """What `LCMScheduler.step` returns: the next sample and the consistency estimate of x0.

    `prev_sample` feeds the next step; `denoised` is what the pipeline decodes after the last step.
    Indexing (`out[0]`, `out["denoised"]`) and `to_tuple()` work like diffusers' output classes.
    """

    prev_sample: torch.Tensor
    denoised: torch.Tensor | None = None

    def to_tuple(self) -> tuple[torch.Tensor, ...]:
        return tuple(v for v in (self.prev_sample, self.denoised) if v is not None)

    def __getitem__(self, key: int | str) -> torch.Tensor:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]


class LCMScheduler(StepCounter):
    """Multistep LCM sampler (Luo et al. 2023, Algorithm 1) with diffusers' `LCMScheduler` API.

    Build it with keyword arguments (`LCMScheduler(beta_schedule="linear")`), a config
    (`LCMScheduler(LCMSchedulerConfig(...))`), `from_config(other_scheduler.config)` or `from_pretrained(folder)`.
    """

    order = 1
    config_name = CONFIG_NAME

    def __init__(self, config: LCMSchedulerConfig | None = None, **kwargs: Any) -> None:
        # Like diffusers, private keys (`_class_name`, `_diffusers_version`) are dropped, so that
        # `LCMScheduler(**other.config)` works for LCM configs; any other unknown key is an error.
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        unknown = sorted(set(kwargs) - set(_FIELD_NAMES))
        if unknown:
            raise TypeError(
                f"LCMScheduler got unknown config keys {unknown}; allowed keys are {list(_FIELD_NAMES)}. "
                "Use `LCMScheduler.from_config(...)` to load a config of another scheduler."
            )
        if config is None:
            config = LCMSchedulerConfig(**kwargs)
        elif isinstance(config, LCMSchedulerConfig):
            config = dataclasses.replace(config, **kwargs)
        else:
            raise TypeError(
                f"LCMScheduler's first argument must be an LCMSchedulerConfig, got {type(config).__name__}; "
                "pass config values as keyword arguments or use `LCMScheduler.from_config(...)`."
            )
        self._config = config

        betas = make_betas(
            config.beta_schedule,
            config.num_train_timesteps,
            config.beta_start,
            config.beta_end,
            config.trained_betas,
        )
        if config.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # alpha_bar used "before" timestep 0; `step` never asks for it (see `step`), kept for parity.
        self.final_alpha_cumprod = torch.tensor(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]

        self.init_noise_sigma = 1.0
        # The reference sets sigma_data lazily inside get_scalings_for_boundary_condition_discrete.
        self.sigma_data = 0.5
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(config.num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self.custom_timesteps = False
        self._step_index: int | None = None
        self._begin_index: int | None = None

    # ------------------------------------------------------------------------------------------
    # Config I/O
    # ------------------------------------------------------------------------------------------

    @property
    def config(self) -> LCMSchedulerConfig:
        return self._config

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> LCMScheduler:
        """Build from an `LCMSchedulerConfig` or a diffusers-style dict, possibly of another scheduler.

        Keys this scheduler knows are kept; others (`skip_prk_steps`, `_class_name`, ...) are ignored, and
        keys listed in the dict's `_use_default_values` are skipped so this scheduler's defaults apply
        (diffusers does the same). `overrides` win over the dict.
        """
        if not isinstance(config, Mapping):
            raise TypeError(
                f"`config` must be an LCMSchedulerConfig or a dict, got {type(config).__name__}; "
                "to load a folder use `LCMScheduler.from_pretrained(folder)`."
            )
        defaults_used = set(config.get("_use_default_values", ()))
        values: dict[str, Any] = {}
        ignored: list[str] = []
        for key, value in config.items():
            if key.startswith("_") or key in defaults_used:
                continue
            if key in _FIELD_NAMES:
                values[key] = value
            else:
                ignored.append(key)
        if ignored:
            logger.debug("LCMScheduler.from_config ignores config keys it does not use: %s", ignored)
        unknown = [key for key in overrides if key not in _FIELD_NAMES]
        if unknown:
            # diffusers silently returns such keyword arguments as "unused"; we say so.
            logger.warning("LCMScheduler.from_config ignores unknown keyword arguments: %s", unknown)
        values.update({k: v for k, v in overrides.items() if k in _FIELD_NAMES})
        return cls(LCMSchedulerConfig(**values))

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, subfolder: str | None = None, **overrides: Any
    ) -> LCMScheduler:
        """Load `scheduler_config.json` from a local folder (or its `subfolder`, e.g. "scheduler").

        Anything wrong with the file (missing, not a JSON object, no settings, a value this scheduler refuses)
        raises a `ModelFileError` naming it.
        """
        path = Path(folder, subfolder or "", CONFIG_NAME)
        config = require_settings(read_config_json(path), path, "scheduler")
        try:
            scheduler = cls.from_config(config)
        except (TypeError, ValueError, NotImplementedError) as e:  # the file's values, refused by name
            raise ModelFileError(one_line(str(e)), path) from e
        return cls.from_config(config, **overrides) if overrides else scheduler  # the caller's values: theirs

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `scheduler_config.json` in the diffusers layout, so `diffusers.LCMScheduler` can load it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        data = {
            **self.config.to_dict(),
            "_class_name": type(self).__name__,
            "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
        }
        (folder / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ------------------------------------------------------------------------------------------
    # Schedule and step counter
    # ------------------------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        original_inference_steps: int | None = None,
        timesteps: Sequence[int] | None = None,
        strength: float = 1.0,
    ) -> None:
        """Choose the sampling timesteps: `num_inference_steps` points of the LCM grid, or custom `timesteps`.

        `original_inference_steps` (default: the config's) sets the distillation grid; `strength` < 1 shrinks
        it for img2img. See `lcm_math.lcm_timesteps` and `lcm_math.custom_lcm_timesteps`.
        """
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `custom_timesteps`.")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        original_steps = (
            original_inference_steps
            if original_inference_steps is not None
            else self.config.original_inference_steps
        )
        T = self.config.num_train_timesteps

        if timesteps is not None:
            schedule = custom_lcm_timesteps(timesteps, T, original_steps, strength)
            # Reference quirk kept for parity: `num_inference_steps` is the length *before* the strength
            # cut. With strength < 1, `step_index` then never reaches `num_inference_steps - 1`, so noise
            # is added even after the last step (`denoised`, which pipelines decode, is unaffected).
            self.num_inference_steps = len(timesteps)
            # Reference quirk: never reset to False by a later standard `set_timesteps`.
            self.custom_timesteps = True
        else:
            schedule = lcm_timesteps(num_inference_steps, T, original_steps, strength)
            self.num_inference_steps = num_inference_steps

        self.timesteps = torch.tensor(schedule, dtype=torch.long, device=device)
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(
        self, timestep: int | torch.Tensor, schedule_timesteps: torch.Tensor | None = None
    ) -> int:
        """Position of `timestep` in the schedule; the second match if it occurs twice (as the reference)."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(f"Timestep {timestep} is not in the schedule {schedule_timesteps.tolist()}.")
        return indices[1 if len(indices) > 1 else 0].item()

    def _init_step_index(self, timestep: int | torch.Tensor) -> None:
        if self.begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def previous_timestep(self, timestep: int | torch.Tensor) -> torch.Tensor | int:
        """The timestep after `timestep` in the schedule, or -1 after the last one."""
        if self.custom_timesteps or self.num_inference_steps:
            index = (self.timesteps == timestep).nonzero(as_tuple=True)[0][0]
            if index == self.timesteps.shape[0] - 1:
                return torch.tensor(-1)
            return self.timesteps[index + 1]
        return timestep - 1

    # ------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------

    def scale_model_input(
        self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Identity: LCM feeds x_t to the model unscaled (kept for the common scheduler API)."""
        return sample

    def get_scalings_for_boundary_condition_discrete(
        self, timestep: int | torch.Tensor
    ) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """(c_skip, c_out) at `timestep` with this config's `timestep_scaling` (see `lcm_math.boundary_scalings`)."""
        self.sigma_data = 0.5
        return boundary_scalings(timestep, self.config.timestep_scaling, self.sigma_data)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> LCMSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One LCM step from x_t (`sample`) at `timestep`: returns (x_prev, denoised).

        Noise z is drawn (like diffusers' `randn_tensor`, shape of `model_output`, dtype of `denoised`)
        at every step but the last, so one-step sampling consumes no randomness.
        """
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        if self.step_index is None:
            self._init_step_index(timestep)
        config = self.config

        # 1. The next timestep. At the last step the reference uses t itself (not -1), so
        #    `final_alpha_cumprod` is never used; alpha_bar_prev only matters for the noise we do not add.
        prev_index = self._step_index + 1
        prev_timestep = self.timesteps[prev_index] if prev_index < len(self.timesteps) else timestep

        # 2. alpha_bar at t and at the next timestep.
        alpha_bar_t = self.alphas_cumprod[timestep]
        alpha_bar_prev = (
            self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        )

        # 3. Boundary scalings and the model's x0 estimate (clipped or thresholded on request).
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(timestep)
        x0 = x0_from_prediction(model_output, sample, alpha_bar_t, config.prediction_type)
        if config.thresholding:
            x0 = dynamic_threshold(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
        elif config.clip_sample:
            x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)

        # 4. The consistency function f(x_t, t) = c_out * x0 + c_skip * x_t.
        denoised = c_out * x0 + c_skip * sample

        # 5. Re-noise to the next timestep, except at the last step. Reference rule kept for parity: "last"
        #    means step_index == num_inference_steps - 1, which the custom-timesteps + strength path never
        #    reaches (see set_timesteps).
        if self._step_index != self.num_inference_steps - 1:
            z = randn_like_reference(model_output.shape, generator, model_output.device, denoised.dtype)
            prev_sample = alpha_bar_prev.sqrt() * denoised + (1 - alpha_bar_prev).sqrt() * z
        else:
            prev_sample = denoised

        self._step_index += 1
        if not return_dict:
            return (prev_sample, denoised)
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)

    # ------------------------------------------------------------------------------------------
    # Forward process (img2img and training)
    # ------------------------------------------------------------------------------------------

    def _sqrt_alpha_bars(
        self, timesteps: torch.Tensor | int, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) per sample, shaped to broadcast against `like`."""
        # As in the reference, alphas_cumprod moves to the samples' device for good (saves later copies).
        self.alphas_cumprod = self.alphas_cumprod.to(device=like.device)
        alpha_bar = self.alphas_cumprod.to(dtype=like.dtype)
        timesteps = torch.as_tensor(timesteps).to(like.device)
        sqrt_alpha_bar = (alpha_bar[timesteps] ** 0.5).flatten()
        sqrt_one_minus_alpha_bar = ((1 - alpha_bar[timesteps]) ** 0.5).flatten()
        while sqrt_alpha_bar.ndim < like.ndim:
            sqrt_alpha_bar = sqrt_alpha_bar.unsqueeze(-1)
        while sqrt_one_minus_alpha_bar.ndim < like.ndim:
            sqrt_one_minus_alpha_bar = sqrt_one_minus_alpha_bar.unsqueeze(-1)
        return sqrt_alpha_bar, sqrt_one_minus_alpha_bar

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | int
    ) -> torch.Tensor:
        """Forward diffusion q(x_t | x0): x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps (DDPM eq. 4)."""
        sqrt_alpha_bar, sqrt_one_minus_alpha_bar = self._sqrt_alpha_bars(timesteps, original_samples)
        return sqrt_alpha_bar * original_samples + sqrt_one_minus_alpha_bar * noise

    def get_velocity(
        self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | int
    ) -> torch.Tensor:
        """The v-prediction target v = sqrt(alpha_bar_t) * eps - sqrt(1 - alpha_bar_t) * x0 (Salimans & Ho 2022)."""
        sqrt_alpha_bar, sqrt_one_minus_alpha_bar = self._sqrt_alpha_bars(timesteps, sample)
        return sqrt_alpha_bar * noise - sqrt_one_minus_alpha_bar * sample
