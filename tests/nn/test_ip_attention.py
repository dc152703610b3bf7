"""IP-Adapter's decoupled cross-attention on `Attention`.

1. With `to_k_ip`/`to_v_ip` and an `ImageContext`, our layer matches diffusers' `Attention` with an
   `IPAdapterAttnProcessor2_0` on the same weights (<= 1e-6).
2. Without an image context, or at scale 0, or with no adapter, the output is bitwise the plain attention's.
"""

from __future__ import annotations

import pytest
import torch
from helpers.reference import assert_close_to_reference

from lcmkit.nn.attention import Attention, ImageContext

DIM, CTX, HEADS, TOKENS = 16, 12, 2, 4


def _pair(scale: float):
    from diffusers.models.attention_processor import Attention as RefAttention
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    torch.manual_seed(0)
    ref = RefAttention(DIM, cross_attention_dim=CTX, heads=HEADS, dim_head=DIM // HEADS).eval()
    proc = IPAdapterAttnProcessor2_0(DIM, cross_attention_dim=CTX, num_tokens=(TOKENS,), scale=scale)
    for layer in (*proc.to_k_ip, *proc.to_v_ip):
        torch.nn.init.normal_(layer.weight, std=0.3)
    ref.set_processor(proc)
    ours = Attention(DIM, context_dim=CTX, heads=HEADS, dim_head=DIM // HEADS, out_bias=True).eval()
    plain_keys = {k: v for k, v in ref.state_dict().items() if not k.startswith("processor")}
    ours.load_state_dict(plain_keys, strict=True)
    ours.to_k_ip = torch.nn.Linear(CTX, DIM, bias=False)
    ours.to_v_ip = torch.nn.Linear(CTX, DIM, bias=False)
    ours.to_k_ip.weight.data.copy_(proc.to_k_ip[0].weight)
    ours.to_v_ip.weight.data.copy_(proc.to_v_ip[0].weight)
    ours.ip_scale = scale
    return ours, ref


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_matches_diffusers_ip_adapter_processor(scale):
    ours, ref = _pair(scale)
    x, text, image = torch.randn(2, 10, DIM), torch.randn(2, 7, CTX), torch.randn(2, TOKENS, CTX)
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=(text, [image]))
        actual = ours(x, ImageContext(text, image))
        plain = ours(x, text)
    assert_close_to_reference(actual, expected, atol=1e-6, what="IP attention")
    assert (actual - plain).abs().max() > 1e-3  # the image branch really contributes


def test_plain_arithmetic_is_bitwise_unchanged():
    ours, _ = _pair(1.0)
    x, text, image = torch.randn(2, 10, DIM), torch.randn(2, 7, CTX), torch.randn(2, TOKENS, CTX)
    plain = Attention(DIM, context_dim=CTX, heads=HEADS, dim_head=DIM // HEADS).eval()
    plain.load_state_dict({k: v for k, v in ours.state_dict().items() if "_ip" not in k}, strict=True)
    with torch.no_grad():
        reference = plain(x, text)
        assert torch.equal(ours(x, text), reference)  # adapter present, no image tokens
        assert torch.equal(plain(x, ImageContext(text, image)), reference)  # image tokens, no adapter
        ours.ip_scale = 0.0
        assert torch.equal(ours(x, ImageContext(text, image)), reference)  # scale 0: the branch is skipped
