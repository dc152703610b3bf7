"""ResnetBlock2D reuses its own intermediate tensors without autograd: same values, inputs and hooks untouched."""

from __future__ import annotations

import pytest
import torch

from lcmkit.nn.resnet import ResnetBlock2D


@pytest.mark.parametrize(
    "in_ch,out_ch,temb,scale", [(32, 32, None, 1.0), (32, 64, 16, 1.0), (64, 32, 16, 2.0)]
)
def test_no_grad_path_equals_the_autograd_path_and_leaves_the_input_alone(in_ch, out_ch, temb, scale):
    torch.manual_seed(0)
    block = ResnetBlock2D(in_ch, out_ch, temb_channels=temb, groups=8, output_scale_factor=scale).eval()
    x = torch.randn(2, in_ch, 9, 7)
    t = torch.randn(2, temb) if temb else None
    with torch.enable_grad():
        expected = block(x, t)  # allocating path (autograd on)
    before = x.clone()
    with torch.no_grad():
        got = block(x, t)
    assert torch.equal(x, before)
    assert torch.equal(got, expected.detach())


def test_a_hook_on_a_norm_sees_the_norm_output_not_its_silu():
    torch.manual_seed(0)
    block = ResnetBlock2D(32, 32, temb_channels=None, groups=8).eval()
    kept = []
    block.norm2.register_forward_hook(lambda module, args, out: kept.append(out))
    x = torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        block(x)
        h = block.conv1(torch.nn.functional.silu(block.norm1(x)))
        assert torch.equal(kept[0], block.norm2(h))  # would hold silu(norm2(h)) had the SiLU run in place
