"""The LCM multistep sampler as a function (Luo et al. 2023, Alg. 3), generic over the scheduler.

`sample_lcm` is the whole loop; the pipelines give it a `predict` that runs the UNet (and classifier-free guidance),
and a `callback` for their step hooks and progress bar. Any scheduler with the LCM step contract works:
`scheduler.step(model_output, t, x_t, generator=..., return_dict=False)` returning `(x_prev, denoised)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def sample_lcm(
    predict: Predict,
    scheduler: Any,
    latents: torch.Tensor,
    timesteps: Iterable[torch.Tensor],
    *,
    generator: torch.Generator | list[torch.Generator] | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor | None:
    """Run the steps and return the last consistency estimate `denoised` (None for an empty schedule).

    For each timestep t:
    1. `model_output = predict(x_t, t)`, the consistency function's raw prediction (noise, v or x0);
    2. `x_t, denoised = scheduler.step(model_output, t, x_t)`: the x0 estimate with the boundary scalings, and
       x0 re-noised to the next timestep (after the last step x_t is `denoised`);
    3. `x_t, denoised = callback(i, t, x_t, denoised)` where given: it may replace the latents the next step
       starts from, and the estimate.
    """
    denoised = None
    for i, t in enumerate(timesteps):
        model_output = predict(latents, t)
        latents, denoised = scheduler.step(model_output, t, latents, generator=generator, return_dict=False)
        if callback is not None:
            latents, denoised = callback(i, t, latents, denoised)
    return denoised
