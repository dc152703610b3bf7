"""`sample_lcm`, the LCM sampler as a function: the loop written out by hand with the same scheduler gives the same
tensors bit for bit; it needs nothing from the scheduler but `step` (any scheduler with the LCM step contract);
the callback sees every step and may replace the latents and the estimate."""

from __future__ import annotations

import torch

from lcmkit.schedulers import LCMScheduler
from lcmkit.schedulers.sampling import sample_lcm


def _predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.sin(x * 3 + t.float() / 100)


def test_matches_the_loop_written_out():
    scheduler = LCMScheduler()
    scheduler.set_timesteps(4)
    timesteps = scheduler.timesteps
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    got = sample_lcm(_predict, scheduler, x0, timesteps, generator=torch.Generator().manual_seed(1))
    scheduler.set_timesteps(4)
    generator, x, denoised = torch.Generator().manual_seed(1), x0, None
    for t in timesteps:
        x, denoised = scheduler.step(_predict(x, t), t, x, generator=generator, return_dict=False)
    assert torch.equal(got, denoised)


class _HalfwayScheduler:
    """Only `step`: x_prev = (x + pred) / 2, denoised = pred."""

    def step(self, pred, t, x, generator=None, return_dict=True):
        return (x + pred) / 2, pred


def test_any_scheduler_with_a_step_and_the_callback():
    seen = []

    def callback(i, t, x, denoised):
        seen.append((i, int(t)))
        return (torch.zeros_like(x), denoised) if i == 0 else (x, denoised + 1)

    x = torch.ones(1, 1, 2, 2)
    out = sample_lcm(lambda x, t: x + t, _HalfwayScheduler(), x, torch.tensor([5, 3]), callback=callback)
    assert seen == [(0, 5), (1, 3)]
    # step 1 starts from the zeros the callback returned: pred = 0 + 3, then the callback adds 1
    assert torch.equal(out, torch.full((1, 1, 2, 2), 4.0))
    assert sample_lcm(lambda x, t: x, _HalfwayScheduler(), x, torch.tensor([])) is None
