"""The pure pieces of latent consistency distillation against hand computations (spec §7, LCM paper Algorithm 1).

They prove: the DDIM solver step is eq. 9 of the paper; the boundary scalings are the scheduler's own (one
implementation) with the values of spec §2.3; the consistency output is exactly what `LCMScheduler.step` returns
as `denoised`; guidance is the paper's form; the skipping-step grid is the scheduler's 50-step schedule; the
pseudo-Huber loss and the EMA update compute their formulas.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lcmkit.schedulers import LCMScheduler, lcm_math
from lcmkit.train import distill as lcd


def test_ddim_solver_step_matches_hand_computation():
    """sqrt(a) x0 + sqrt(1 - a) eps, elementwise, with a number and with per-sample alpha_bar_prev."""
    x0 = torch.tensor([[[[1.0, -2.0]]], [[[0.5, 3.0]]]])
    eps = torch.tensor([[[[0.25, 1.0]]], [[[-1.0, 2.0]]]])
    out = lcd.ddim_solver_step(x0, eps, 0.64)  # sqrt 0.8, sqrt(0.36) = 0.6
    expected = torch.tensor(
        [[[[0.8 * 1 + 0.6 * 0.25, 0.8 * -2 + 0.6 * 1]]], [[[0.8 * 0.5 - 0.6, 0.8 * 3 + 0.6 * 2]]]]
    )
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    per_sample = lcd.ddim_solver_step(x0, eps, torch.tensor([0.64, 0.36]))
    torch.testing.assert_close(per_sample[0], expected[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(per_sample[1], 0.6 * x0[1] + 0.8 * eps[1], atol=1e-6, rtol=0)
    # alpha_bar_prev = 1 (t_n = 0 in the limit) returns x0 itself: the solver lands on the data.
    torch.testing.assert_close(lcd.ddim_solver_step(x0, eps, 1.0), x0)


def test_boundary_scalings_values_and_single_implementation():
    """c_skip = 0.25/((10t)^2 + 0.25), c_out = 10t/sqrt((10t)^2 + 0.25); values of spec §2.3; same as the scheduler."""
    assert lcm_math.boundary_scalings(0) == (1.0, 0.0)  # the boundary condition f(x, 0) = x
    c_skip, c_out = lcm_math.boundary_scalings(999)
    assert c_skip == pytest.approx(0.25 / (9990**2 + 0.25), rel=1e-12)
    assert c_skip == pytest.approx(2.505e-9, rel=1e-3)
    assert c_out == pytest.approx(9990 / math.sqrt(9990**2 + 0.25), rel=1e-12)
    c_skip_19, c_out_19 = lcm_math.boundary_scalings(19)
    assert c_skip_19 == pytest.approx(6.925e-6, rel=1e-3)
    assert c_out_19 == pytest.approx(0.9999965, abs=1e-7)
    scheduler = LCMScheduler()
    for t in (0, 19, 259, 999):
        assert scheduler.get_scalings_for_boundary_condition_discrete(t) == lcm_math.boundary_scalings(t)
    assert (
        lcd.boundary_scalings is lcm_math.boundary_scalings
    )  # distillation imports, not re-implements, them


def test_consistency_output_equals_scheduler_denoised():
    """The training-side f(x_t, t) = c_skip x_t + c_out x0 is bit-identical to `LCMScheduler.step(...).denoised`."""
    g = torch.Generator().manual_seed(0)
    x_t, model_output = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    scheduler = LCMScheduler()
    scheduler.set_timesteps(4)
    for t in scheduler.timesteps:
        step = scheduler.step(model_output, t, x_t, generator=torch.Generator().manual_seed(1))
        x0 = lcm_math.x0_from_prediction(model_output, x_t, scheduler.alphas_cumprod[t])
        assert torch.equal(lcd.consistency_output(x_t, x0, t), step.denoised)
    # A per-sample timestep tensor broadcasts over the batch.
    t = torch.tensor([0, 999])
    out = lcd.consistency_output(x_t, torch.zeros_like(x_t), t)
    assert torch.equal(out[0], x_t[0])  # c_skip(0) = 1, c_out(0) = 0
    torch.testing.assert_close(out[1], x_t[1] * lcm_math.boundary_scalings(999)[0])


def test_guidance_is_the_paper_form():
    """cond + w (cond - uncond): w = 0 gives cond; the pipeline's guidance_scale is w + 1 (Imagen form)."""
    cond, uncond = torch.full((2, 1, 1, 1), 3.0), torch.full((2, 1, 1, 1), 1.0)
    out = lcd.guided(cond, uncond, torch.tensor([0.0, 7.5]))
    assert out.flatten().tolist() == [3.0, 3.0 + 7.5 * 2.0]
    imagen = uncond + 8.5 * (cond - uncond)  # guidance_scale = w + 1
    assert torch.equal(out[1], imagen[1])


def test_ddim_grid_is_the_schedulers_skipping_grid():
    """tau_n = (n + 1) k - 1 with k = T // N (diffusers' DDIMSolver), i.e. the LCM scheduler's N-step schedule reversed."""
    grid = lcd.ddim_timesteps(1000, 50)
    assert grid.tolist() == [(n + 1) * 20 - 1 for n in range(50)]
    scheduler = LCMScheduler()
    scheduler.set_timesteps(50)
    assert grid.flip(0).tolist() == scheduler.timesteps.tolist()
    assert lcd.ddim_timesteps(1000, 30).tolist()[:2] == [32, 65]  # k = 33


def test_huber_loss_formula_and_limits():
    """mean(sqrt(d^2 + c^2) - c): zero at d = 0, about |d| for |d| >> c, about d^2/(2c) for |d| << c."""
    pred, target = torch.tensor([0.0, 1.0, -2.0, 1e-4]), torch.zeros(4)
    c = 0.001
    expected = sum(math.sqrt(d * d + c * c) - c for d in (0.0, 1.0, -2.0, 1e-4)) / 4
    assert lcd.huber_loss(pred, target, c).item() == pytest.approx(expected, rel=1e-6)
    assert lcd.huber_loss(torch.zeros(3), torch.zeros(3)).item() == 0.0
    assert lcd.huber_loss(torch.tensor([1e-5]), torch.zeros(1), c).item() == pytest.approx(
        1e-10 / (2 * c), rel=1e-2
    )


def test_ema_update_moves_target_toward_online():
    """phi^- <- mu phi^- + (1 - mu) phi for every parameter; mu = 1 freezes, mu = 0 copies; mismatches are refused."""
    target, online = nn.Linear(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        target.weight.fill_(1.0), target.bias.fill_(-1.0)
        online.weight.fill_(3.0), online.bias.fill_(1.0)
    lcd.ema_update(target, online, 0.95)
    torch.testing.assert_close(target.weight, torch.full((2, 3), 0.95 * 1 + 0.05 * 3))
    torch.testing.assert_close(target.bias, torch.full((2,), 0.95 * -1 + 0.05 * 1))
    before = target.weight.clone()
    lcd.ema_update(target, online, 1.0)
    assert torch.equal(target.weight, before)
    lcd.ema_update(target, online, 0.0)
    assert torch.equal(target.weight, online.weight)
    assert target.weight.grad_fn is None  # updated in place outside autograd
    with pytest.raises(ValueError, match="different parameters"):
        lcd.ema_update(nn.Linear(3, 2), nn.Linear(3, 2, bias=False), 0.9)
    with pytest.raises(ValueError, match="EMA decay"):
        lcd.ema_update(target, online, 1.5)
