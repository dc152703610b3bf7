"""A short LCD training run on a tiny random teacher: the loss is finite and goes down.

On one fixed batch with the same noise, solver index and w at every step (the generator is reseeded), twenty
AdamW steps must lower the LCD loss: mean of the last three below 0.9 x the mean of the first three. It proves the
student's gradient path (online consistency output -> loss) is connected and points the right way, that the
teacher and target do not receive gradients, and that the EMA keeps the target close to the student.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.tiny_models import MINUTE_UNET

from lcmkit.models.unet import UNet2DConditionModel
from lcmkit.schedulers import LCMScheduler
from lcmkit.train.distill import LCDObjective, ema_update, make_student

TEACHER = MINUTE_UNET


def _run(loss_type: str, steps: int = 20) -> tuple[list[float], torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    teacher = UNet2DConditionModel(TEACHER).eval().requires_grad_(False)
    student = make_student(teacher, w_embedding_dim=16)
    target = copy.deepcopy(student).requires_grad_(False)
    objective = LCDObjective(
        teacher, target, LCMScheduler(), num_ddim_timesteps=10, w_min=1.0, w_max=3.0, loss_type=loss_type
    )
    g = torch.Generator().manual_seed(1)
    z0, c, uncond = (
        torch.randn(4, 4, 8, 8, generator=g),
        torch.randn(4, 6, 16, generator=g),
        torch.randn(1, 6, 16, generator=g),
    )
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss, _ = objective.loss(student, z0, c, uncond, generator=torch.Generator().manual_seed(2))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update(target, student, 0.95)
        losses.append(loss.item())
    return losses, teacher, target


@pytest.mark.parametrize("loss_type", ["huber", "l2"])
def test_lcd_loss_is_finite_and_decreases(loss_type):
    losses, teacher, target = _run(loss_type)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.9 * first, losses
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in target.parameters())
