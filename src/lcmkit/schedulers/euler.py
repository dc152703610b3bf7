"""`EulerDiscreteScheduler`: the deterministic Euler sampler in sigma space (Karras et al. 2022, Alg. 1 with
no churn), as few-step LoRAs (Hyper-SD, PCM, DMD2-style) are often run with "trailing" spacing.

With sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the model sees x / sqrt(sigma^2 + 1)
(`scale_model_input`), its output gives x0, and one step is x_next = x + (x - x0) / sigma * (sigma_next - sigma).
Sigmas at non-integer timesteps are linearly interpolated in t; the last sigma is 0, so the last step lands on x0.
Timesteps, sigmas and step outputs match diffusers 0.42 `EulerDiscreteScheduler` (linear interpolation,
s_churn = 0); the Karras/exponential/beta sigma variants and churn are refused by name.

Unlike LCM, this sampler needs `scale_model_input` before the model and `init_noise_sigma` (> 1) on the
initial noise; a loop that skips either gives wrong images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lcmkit.schedulers.counter import StepCounter
from lcmkit.schedulers.ddim import TIMESTEP_SPACINGS, spaced_timesteps
from lcmkit.schedulers.lcm_math import make_betas, rescale_zero_terminal_snr

_UNSUPPORTED = {"use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"}


@dataclass(frozen=True)
class EulerDiscreteSchedulerConfig:
    """The config keys of diffusers' `EulerDiscreteScheduler` that this sampler honours, with its defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    interpolation_type: str = "linear"
    timestep_spacing: str = "linspace"
    timestep_type: str = "discrete"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"

    def __post_init__(self) -> None:
        if self.trained_betas is not None:
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
        allowed = {
            "timestep_spacing": TIMESTEP_SPACINGS,
            "interpolation_type": ("linear",),
            "timestep_type": ("discrete",),
            "final_sigmas_type": ("zero", "sigma_min"),
            "prediction_type": ("epsilon", "sample", "v_prediction"),
        }
        for name, values in allowed.items():
            if getattr(self, name) not in values:
                raise ValueError(
                    f"EulerDiscreteScheduler {name}={getattr(self, name)!r} is not supported; use one of {list(values)}"
                )


_FIELDS = tuple(f.name for f in dataclasses.fields(EulerDiscreteSchedulerConfig))


@dataclass
class EulerDiscreteSchedulerOutput:
    """`prev_sample` feeds the next step; `denoised` (alias `pred_original_sample`) is the step's x0."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor

    @property
    def pred_original_sample(self) -> torch.Tensor:
        return self.denoised


class EulerDiscreteScheduler(StepCounter):
    """Euler sampler with the part of diffusers' `EulerDiscreteScheduler` API a sampling loop uses."""

    order = 1

    def __init__(self, config: EulerDiscreteSchedulerConfig | None = None, **kwargs: Any) -> None:
        config = config or EulerDiscreteSchedulerConfig()
        self.config = dataclasses.replace(config, **kwargs) if kwargs else config
        c = self.config
        betas = make_betas(c.beta_schedule, c.num_train_timesteps, c.beta_start, c.beta_end, c.trained_betas)
        if c.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if c.rescale_betas_zero_snr:
            # alpha_bar_T = 0 would give an infinite sigma; the reference uses 2^-24 instead.
            self.alphas_cumprod[-1] = 2**-24
        self.num_inference_steps: int | None = None
        train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).flip(0)
        self.sigmas = torch.cat([train_sigmas, torch.zeros(1)])
        self.timesteps = torch.arange(c.num_train_timesteps - 1, -1, -1, dtype=torch.float32)
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> EulerDiscreteScheduler:
        """From any diffusers scheduler dict: known keys kept, others ignored; sigma variants refused."""
        skip = set(config.get("_use_default_values", ()))
        merged = {**config, **overrides}
        wanted = sorted(k for k in _UNSUPPORTED if merged.get(k) and k not in skip)
        if wanted:
            raise ValueError(f"EulerDiscreteScheduler does not support {wanted}; only plain (linear) sigmas")
        unknown = sorted(set(overrides) - set(_FIELDS) - _UNSUPPORTED)
        if unknown:
            raise ValueError(
                f"EulerDiscreteScheduler has no config keys {unknown}; known keys: {list(_FIELDS)}"
            )
        values = {k: v for k, v in merged.items() if k in _FIELDS and (k not in skip or k in overrides)}
        return cls(EulerDiscreteSchedulerConfig(**values))

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """Std of the initial noise: sigma_max ("linspace"/"trailing") or sqrt(sigma_max^2 + 1) ("leading")."""
        sigma_max = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return sigma_max
        return (sigma_max**2 + 1) ** 0.5

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | None = None,
        original_inference_steps: int | None = None,
        strength: float = 1.0,
    ) -> None:
        """`num_inference_steps` spaced by the config's `timestep_spacing`, or a custom descending `timesteps` list.

        `original_inference_steps` is accepted and unused, so the LCM pipelines can call this like
        `LCMScheduler.set_timesteps`; img2img (`strength` < 1) is refused: this scheduler has no `add_noise`.
        """
        if strength != 1.0:
            raise ValueError(
                f"EulerDiscreteScheduler supports text-to-image only (strength 1.0), got strength {strength}; "
                "use LCMScheduler or TCDScheduler for img2img."
            )
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("Pass exactly one of `num_inference_steps` or `timesteps`.")
        T = self.config.num_train_timesteps
        if timesteps is not None:
            grid = np.array([float(t) for t in timesteps], dtype=np.float32)
            if grid.size == 0 or (np.diff(grid) >= 0).any() or grid[0] >= T or grid[-1] < 0:
                raise ValueError(
                    f"`timesteps` must be a non-empty, strictly descending list in [0, {T - 1}], got {list(timesteps)}"
                )
            n = len(grid)
        else:
            n = num_inference_steps
            if not 1 <= n <= T:
                raise ValueError(f"num_inference_steps must be between 1 and {T}, got {n}")
            if self.config.timestep_spacing == "linspace":  # unrounded here, unlike DDIM (reference rule)
                grid = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
            else:
                grid = spaced_timesteps(self.config.timestep_spacing, n, T, self.config.steps_offset)
                grid = grid.astype(np.float32)
        self.num_inference_steps = n
        train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        sigmas = np.interp(grid, np.arange(0, len(train_sigmas)), train_sigmas)
        if self.config.final_sigmas_type == "sigma_min":
            last = float(((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5)
        else:
            last = 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas)
        self.timesteps = torch.from_numpy(grid.astype(np.float32)).to(device=device)
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: float | torch.Tensor) -> int:
        """Position of `timestep` in the schedule; the second match if it occurs twice (as the reference)."""
        indices = (self.timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(f"Timestep {timestep} is not in the schedule {self.timesteps.tolist()}.")
        return indices[1 if len(indices) > 1 else 0].item()

    def _init_step_index(self, timestep: float | torch.Tensor) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
        else:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        """x / sqrt(sigma^2 + 1): the model was trained on unit-variance inputs (variance-preserving x_t)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        return sample / ((sigma**2 + 1) ** 0.5)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> EulerDiscreteSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One Euler step from `sample` at sigma(timestep) to the next sigma; draws no noise (`generator` unused)."""
        if self.num_inference_steps is None:
            raise ValueError("call `set_timesteps` before `step`")
        if self._step_index is None:
            self._init_step_index(timestep)
        sample = sample.to(torch.float32)
        sigma = self.sigmas[self._step_index]
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = sample - sigma * model_output
        elif kind == "sample":
            x0 = model_output
        else:  # v_prediction, in the sigma parameterisation
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        derivative = (sample - x0) / sigma
        dt = self.sigmas[self._step_index + 1] - sigma
        prev_sample = (sample + derivative * dt).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0)
        return EulerDiscreteSchedulerOutput(prev_sample=prev_sample, denoised=x0)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
