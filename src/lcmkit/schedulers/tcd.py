"""`TCDScheduler`: the Trajectory Consistency Distillation sampler (Zheng et al. 2024, arXiv:2402.19159).

TCD keeps LCM's schedule and config but changes the step: from x_t it predicts x0 and eps, moves to an
intermediate timestep s = floor((1 - gamma) * t_prev) along the deterministic trajectory
(x_s = sqrt(alpha_bar_s) * x0 + sqrt(1 - alpha_bar_s) * eps, the paper's "strategic stochastic sampling"),
then, except at the last step, re-noises from s to t_prev:
x_prev = sqrt(alpha_bar_prev / alpha_bar_s) * x_s + sqrt(1 - alpha_bar_prev / alpha_bar_s) * z.
gamma = 0 is deterministic; gamma = 1 is LCM-like full re-noising. No boundary scalings (c_skip, c_out).

`gamma` is the diffusers `eta` argument of `step`; it defaults to the scheduler's `gamma` attribute (0.3, the
paper's default), so that a pipeline that calls `step(model_output, t, sample, generator=...)` can use it
unchanged. The config is LCMScheduler's (the same keys as diffusers' `TCDScheduler`), so configs load both ways.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lcmkit.schedulers.lcm import LCMScheduler, LCMSchedulerConfig
from lcmkit.schedulers.lcm_math import custom_lcm_timesteps, eps_from_prediction, x0_from_prediction
from lcmkit.schedulers.randn import randn_like_reference

DEFAULT_GAMMA = 0.3


@dataclass
class TCDSchedulerOutput:
    """`prev_sample` feeds the next step; `denoised` (alias `pred_noised_sample`) is x_s, the trajectory point.

    After the last step both are the same tensor (s = 0), which is what the pipeline decodes.
    """

    prev_sample: torch.Tensor
    denoised: torch.Tensor

    @property
    def pred_noised_sample(self) -> torch.Tensor:
        return self.denoised

    def to_tuple(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.prev_sample, self.denoised)

    def __getitem__(self, key: int | str) -> torch.Tensor:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]


class TCDScheduler(LCMScheduler):
    """TCD sampler with diffusers' `TCDScheduler` API; `scheduler.gamma` is the default stochasticity."""

    def __init__(self, config: LCMSchedulerConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.gamma = DEFAULT_GAMMA

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        original_inference_steps: int | None = None,
        timesteps: Sequence[int] | None = None,
        strength: float = 1.0,
    ) -> None:
        """As `LCMScheduler.set_timesteps`, with one reference rule kept for parity: when the caller passes
        `original_inference_steps`, the grid picked from is every training timestep below T * strength, not
        the skipping-step grid (diffusers' `TCDScheduler` does this; the value then only bounds the step count).
        """
        if original_inference_steps is None or (num_inference_steps is None) == (timesteps is None):
            super().set_timesteps(num_inference_steps, device, original_inference_steps, timesteps, strength)
            return
        T = self.config.num_train_timesteps
        if strength > 1.0:
            raise ValueError(f"`strength` must be in (0, 1], got {strength}.")
        grid = np.arange(0, int(T * strength), dtype=np.int64)
        if timesteps is not None:
            # Same checks and warnings as LCM, against the full training grid (k = 1).
            schedule = custom_lcm_timesteps(timesteps, T, T, strength)
            self.num_inference_steps = len(timesteps)
            self.custom_timesteps = True
        else:
            n = num_inference_steps
            if not 1 <= n <= min(T, original_inference_steps):
                raise ValueError(
                    f"`num_inference_steps` must be between 1 and min(num_train_timesteps, "
                    f"original_inference_steps) = {min(T, original_inference_steps)}, got {n}."
                )
            if len(grid) < n:
                raise ValueError(
                    f"strength {strength} leaves {len(grid)} training timesteps, fewer than "
                    f"`num_inference_steps` {n}; raise `strength` or lower the step count."
                )
            grid = grid[::-1]
            schedule = grid[np.floor(np.linspace(0, len(grid), num=n, endpoint=False)).astype(np.int64)]
            self.num_inference_steps = n
        self.timesteps = torch.tensor(np.asarray(schedule), dtype=torch.long, device=device)
        self._step_index = None
        self._begin_index = None

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> TCDSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One TCD step from x_t (`sample`) at `timestep` with gamma = `eta` (default: `self.gamma`).

        Noise is drawn only when gamma > 0 and this is not the last step, as the reference does.
        """
        gamma = self.gamma if eta is None else float(eta)
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"TCD gamma (`eta`) must be in [0, 1], got {gamma}.")
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        if self.step_index is None:
            self._init_step_index(timestep)

        # The next timestep (0 after the last one) and the trajectory point s between it and t.
        prev_index = self._step_index + 1
        t_prev = self.timesteps[prev_index] if prev_index < len(self.timesteps) else torch.tensor(0)
        s = torch.floor((1 - gamma) * t_prev).to(dtype=torch.long)

        alpha_bar_t = self.alphas_cumprod[timestep]
        alpha_bar_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        alpha_bar_s = self.alphas_cumprod[s]

        kind = self.config.prediction_type
        x0 = x0_from_prediction(model_output, sample, alpha_bar_t, kind)
        eps = eps_from_prediction(model_output, sample, alpha_bar_t, kind)
        x_s = alpha_bar_s.sqrt() * x0 + (1 - alpha_bar_s).sqrt() * eps

        if gamma > 0 and self._step_index != self.num_inference_steps - 1:
            z = randn_like_reference(model_output.shape, generator, model_output.device, x_s.dtype)
            ratio = alpha_bar_prev / alpha_bar_s
            prev_sample = ratio.sqrt() * x_s + (1 - ratio).sqrt() * z
        else:
            prev_sample = x_s

        self._step_index += 1
        if not return_dict:
            return (prev_sample, x_s)
        return TCDSchedulerOutput(prev_sample=prev_sample, denoised=x_s)
