"""Offset noise (`teacher.draw_noise`) and its use by the teacher's and the distillation's objectives.

What it proves: offset 0 is exactly `torch.randn` (old runs keep their random stream); an offset adds one
N(0, offset^2) constant per sample and channel, the same over all pixels; a negative offset is refused. The teacher's
epsilon loss draws its noise that way (an all-zero prediction's loss is E[eps^2] = 1 + offset^2), and the LCD
objective noises z0 to z_{t_{n+k}} with exactly `draw_noise(shape, offset, generator)` (the student sees that x_t).
"""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_models import MINUTE_UNET
from torch import nn

from lcmkit.models.unet import UNet2DConditionModel
from lcmkit.schedulers import LCMScheduler
from lcmkit.train.distill import LCDObjective, make_student
from lcmkit.train.teacher import DiffusionObjective, draw_noise


def test_zero_offset_is_plain_randn():
    a = draw_noise((3, 4, 8, 8), 0.0, torch.Generator().manual_seed(5))
    b = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_offset_is_one_constant_per_sample_and_channel():
    shape = (3, 4, 8, 8)
    g = torch.Generator().manual_seed(5)
    plain = torch.randn(shape, generator=g)
    offsets = torch.randn((3, 4, 1, 1), generator=g)
    noise = draw_noise(shape, 0.3, torch.Generator().manual_seed(5))
    torch.testing.assert_close(noise - plain, (0.3 * offsets).expand(shape), rtol=0, atol=1e-6)


def test_offset_sets_the_variance_of_the_pixel_mean():
    """Over 16x16 pixels plain noise's mean has variance 1/256; an offset o adds o^2."""
    means = draw_noise((4000, 4, 16, 16), 0.2, torch.Generator().manual_seed(0)).mean((2, 3))
    assert means.var().item() == pytest.approx(1 / 256 + 0.04, rel=0.05)


def test_negative_offset_is_refused():
    with pytest.raises(ValueError, match="noise_offset must be >= 0"):
        draw_noise((1, 4, 8, 8), -0.1)


class _ZeroPredictor(nn.Module):
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x_t)


class _Posterior:
    def __init__(self, z: torch.Tensor) -> None:
        self.z = z

    def sample(self) -> torch.Tensor:
        return self.z


class _ZeroVAE(nn.Module):
    """Encodes every image to zero latents (so the loss below is the noise's own second moment)."""

    dtype = torch.float32

    class config:  # noqa: N801 - mimics the VAE's config attribute
        scaling_factor = 1.0

    def encode(self, images: torch.Tensor):
        out = type("Out", (), {})()
        out.latent_dist = _Posterior(torch.zeros(len(images), 4, 8, 8))
        return out


class _Tokenizer:
    model_max_length = 4

    def __call__(self, captions, **_: object):
        out = type("Ids", (), {})()
        out.input_ids = torch.zeros(len(captions), 4, dtype=torch.long)
        return out


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_teacher_objective_draws_offset_noise(offset):
    torch.manual_seed(0)
    objective = DiffusionObjective(_ZeroVAE(), _Tokenizer(), LCMScheduler(), noise_offset=offset)
    images = torch.zeros(256, 3, 32, 32)
    loss, _ = objective(_ZeroPredictor(), (images, ["a"] * 256))
    assert loss.item() == pytest.approx(1 + offset**2, abs=0.05)


def test_lcd_objective_noises_with_draw_noise():
    torch.manual_seed(0)
    teacher = UNet2DConditionModel(MINUTE_UNET).eval().requires_grad_(False)
    target = make_student(teacher, w_embedding_dim=16).requires_grad_(False)
    scheduler = LCMScheduler()
    objective = LCDObjective(teacher, target, scheduler, num_ddim_timesteps=10, noise_offset=0.3)
    seen = []

    class Student(nn.Module):
        def forward(self, x_t, t, c, timestep_cond=None, return_dict=False):
            seen.append(x_t.clone())
            return (torch.zeros_like(x_t),)

    z0, c, uncond = torch.randn(3, 4, 8, 8), torch.randn(3, 6, 16), torch.randn(1, 6, 16)
    objective.loss(Student(), z0, c, uncond, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    eps = draw_noise(z0.shape, 0.3, g)
    n = torch.randint(0, len(objective.timesteps), (3,), generator=g)
    expected = scheduler.add_noise(z0, eps, objective.timesteps[n])
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=1e-6)
    plain = scheduler.add_noise(
        z0, torch.randn(z0.shape, generator=torch.Generator().manual_seed(2)), objective.timesteps[n]
    )
    assert not torch.allclose(seen[0], plain, atol=1e-3), "the offset changed nothing"
