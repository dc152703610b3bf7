"""`Attention` on feature maps: a channels-last input takes the view path and gives the NCHW path's values."""

from __future__ import annotations

import pytest
import torch

from lcmkit.nn.attention import Attention


@pytest.mark.parametrize("norm_groups, residual, heads", [(4, True, 1), (None, False, 2)])
def test_channels_last_feature_map(norm_groups, residual, heads):
    torch.manual_seed(0)
    attn = Attention(
        16, heads=heads, dim_head=16 // heads, bias=True, norm_groups=norm_groups, residual=residual
    )
    x = torch.randn(2, 16, 5, 7)
    with torch.no_grad():
        expected = attn(x)
        actual = attn(x.contiguous(memory_format=torch.channels_last))
    assert actual.shape == expected.shape == x.shape
    assert actual.is_contiguous(memory_format=torch.channels_last) and not actual.is_contiguous()
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    if residual:  # the residual really is added on the channels-last path
        assert (actual - x).abs().max() < (actual.abs().max() + x.abs().max())
        attn.residual = False
        with torch.no_grad():
            plain = attn(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(actual, plain + x, atol=1e-5, rtol=0)
