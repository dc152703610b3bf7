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


def _block(in_ch, out_ch, sum_into_input):
    torch.manual_seed(0)
    block = ResnetBlock2D(in_ch, out_ch, temb_channels=None, groups=8).eval()
    block.sum_into_input = sum_into_input
    return block


@pytest.mark.parametrize("channels_last", [False, True])
def test_sum_into_input_writes_the_same_result_into_the_input(channels_last):
    """Above 32x32 pixels conv2 adds its output into the block's input (one oneDNN conv with a sum post-op):
    bitwise the allocating path's result, returned as the input tensor itself."""
    x = torch.randn(2, 32, 40, 36)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = _block(32, 32, False)(x)
        assert not torch.equal(expected, x)
        block = _block(32, 32, True)
        got = block(x)
    assert got.data_ptr() == x.data_ptr()  # written into the input
    assert torch.equal(got, expected)


def test_sum_into_input_leaves_the_input_alone_when_it_may_be_read():
    """Off by default (the UNet keeps its blocks' inputs as skip connections), under autograd, with a hook on the
    block or on conv2, for small maps, and for a LoRA-wrapped conv2."""
    from lcmkit.nn.lora import LoraLayer

    x = torch.randn(1, 32, 40, 40)
    before = x.clone()
    with torch.no_grad():
        expected = _block(32, 32, False)(x)
    assert torch.equal(x, before)
    with torch.enable_grad():
        assert torch.allclose(_block(32, 32, True)(x), expected, atol=1e-6, rtol=0)
    for where in ("block", "conv2"):
        block = _block(32, 32, True)
        handle = (block if where == "block" else block.conv2).register_forward_hook(lambda *a: None)
        with torch.no_grad():
            assert torch.equal(block(x), expected)
        handle.remove()
    assert torch.equal(x, before)
    small = torch.randn(1, 32, 30, 30)
    small_before = small.clone()
    with torch.no_grad():
        _block(32, 32, True)(small)
    assert torch.equal(small, small_before)
    block = _block(32, 32, True)
    block.conv2 = LoraLayer(block.conv2)  # wrapped, no adapter yet: the base conv's arithmetic
    with torch.no_grad():
        assert torch.equal(block(x), expected)
    assert torch.equal(x, before)


def test_a_shortcut_block_sums_into_its_own_shortcut_output():
    """With a channel change the residual is conv_shortcut(x), a fresh tensor: fused even in the UNet's blocks,
    and the input stays as it was."""
    x = torch.randn(1, 32, 40, 40)
    before = x.clone()
    with torch.no_grad():
        expected = _block(32, 64, False)
        expected.conv2.add_into = lambda *a: None  # the allocating path, for reference
        ref = expected(x)
        got = _block(32, 64, False)(x)
    assert torch.equal(x, before)
    assert torch.equal(got, ref)


def test_the_vae_sums_into_its_blocks_inputs_but_not_into_the_latents():
    from lcmkit.models.vae import AutoencoderKL
    from lcmkit.tiny import TINY_VAE

    torch.manual_seed(0)
    vae = AutoencoderKL(TINY_VAE).eval()
    blocks = [m for m in vae.modules() if isinstance(m, ResnetBlock2D)]
    assert blocks and all(b.sum_into_input for b in blocks)
    z = torch.randn(1, 4, 40, 40)
    before = z.clone()
    with torch.no_grad():
        fused = vae.decode(z).sample
        for b in blocks:
            b.sum_into_input = False
        plain = vae.decode(z).sample
    assert torch.equal(z, before)
    assert torch.equal(fused, plain)
