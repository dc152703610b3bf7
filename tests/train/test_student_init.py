"""The student's w-embedding path: built from the teacher with a zero `time_embedding.cond_proj`, it equals the
teacher exactly for every guidance scale w, until training moves cond_proj (then w matters).

This is what makes distillation start at the teacher (LCM paper §4.2; diffusers' LCD script zero-initialises the
new input the same way), and it proves the w-embedding really reaches the UNet through cond_proj.
"""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_models import MINUTE_UNET

from lcmkit.config import replace
from lcmkit.models.unet import UNet2DConditionModel
from lcmkit.schedulers.lcm_math import guidance_scale_embedding
from lcmkit.train.distill import make_student

TEACHER = MINUTE_UNET


@pytest.fixture(scope="module")
def teacher() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(TEACHER).eval()


def _inputs(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(batch, 4, 8, 8, generator=g),
        torch.tensor([19, 499, 999]),
        torch.randn(batch, 5, 16, generator=g),
    )


def test_student_copies_teacher_and_zero_inits_cond_proj(teacher):
    student = make_student(teacher, w_embedding_dim=32)
    assert student.config == replace(TEACHER, time_cond_proj_dim=32)
    assert student.time_embedding.cond_proj.weight.shape == (16, 32)
    assert torch.count_nonzero(student.time_embedding.cond_proj.weight) == 0
    teacher_state = teacher.state_dict()
    for name, value in student.state_dict().items():
        if name != "time_embedding.cond_proj.weight":
            assert torch.equal(value, teacher_state[name]), name
    assert student.time_embedding.cond_proj.weight.requires_grad
    # The copy is deep: training the student cannot touch the teacher.
    assert student.conv_in.weight.data_ptr() != teacher.conv_in.weight.data_ptr()


@pytest.mark.parametrize("w", [0.0, 1.0, 7.5, 14.0])
def test_student_equals_teacher_at_init_for_any_w(teacher, w):
    """Bit-identical outputs: a zero cond_proj adds exactly 0 to the timestep features, whatever w is."""
    student = make_student(teacher, w_embedding_dim=32).eval()
    x, t, context = _inputs()
    w_emb = guidance_scale_embedding(torch.full((3,), w), 32)
    with torch.no_grad():
        expected = teacher(x, t, context).sample
        got = student(x, t, context, timestep_cond=w_emb).sample
    assert torch.equal(got, expected)


def test_trained_cond_proj_makes_w_matter(teacher):
    """The test above can fail: once cond_proj is non-zero, different w give different outputs."""
    student = make_student(teacher, w_embedding_dim=32).eval()
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.normal_(std=0.1, generator=torch.Generator().manual_seed(2))
        x, t, context = _inputs()
        low = student(x, t, context, timestep_cond=guidance_scale_embedding(torch.full((3,), 1.0), 32)).sample
        high = student(
            x, t, context, timestep_cond=guidance_scale_embedding(torch.full((3,), 8.0), 32)
        ).sample
        plain = teacher(x, t, context).sample
    assert (low - high).abs().max() > 1e-4
    assert (low - plain).abs().max() > 1e-4


def test_teacher_with_w_embedding_keeps_it(teacher):
    """Distilling an LCM again keeps its w-embedding dimension and weights (nothing is re-initialised)."""
    torch.manual_seed(3)
    lcm = UNet2DConditionModel(replace(TEACHER, time_cond_proj_dim=8))
    student = make_student(lcm, w_embedding_dim=256)
    assert student.config.time_cond_proj_dim == 8
    assert torch.equal(student.time_embedding.cond_proj.weight, lcm.time_embedding.cond_proj.weight)
