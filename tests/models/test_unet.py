"""lcmkit's `UNet2DConditionModel` on its own (no diffusers): checkpoint key names, loading, input checks, FreeU.

Numerical parity with diffusers lives in tests/parity/test_unet_parity.py; this file proves the contracts that
do not need the oracle: the attribute names are the diffusers keys, the model builds on the meta device
and loads strictly from its own folder, bad inputs fail with a clear ValueError, FreeU's switches behave
as spec §3 says, and the FreeU math has the properties it claims (DC-only scaling, no input mutation).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from helpers.reference import assert_close_to_reference
from helpers.tiny_models import SMALL_UNET as CONFIG

from lcmkit.config import ConfigError, replace
from lcmkit.models.unet import UNet2DConditionModel, UNet2DConditionOutput
from lcmkit.nn.conv import set_conv_prepacking
from lcmkit.nn.freeu import apply_freeu, fourier_filter


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster, and with far less jitter, on one thread than on two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(CONFIG).eval()


def _inputs(batch: int = 2, height: int = 8, width: int = 8) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(batch, 4, height, width, generator=gen),
        "encoder_hidden_states": torch.randn(batch, 5, 12, generator=gen),
        "timestep_cond": torch.randn(batch, 6, generator=gen),
    }


def _run(model: UNet2DConditionModel, timestep=500, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(timestep=timestep, **(inputs or _inputs())).sample


def test_attribute_names_are_diffusers_keys(unet):
    keys = set(unet.state_dict())
    expected = {
        "conv_in.weight",
        "time_embedding.linear_1.weight",
        "time_embedding.cond_proj.weight",
        "time_embedding.linear_2.bias",
        "down_blocks.0.resnets.0.time_emb_proj.weight",
        "down_blocks.0.attentions.0.norm.weight",
        "down_blocks.0.attentions.0.proj_in.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.bias",
        "down_blocks.0.attentions.0.transformer_blocks.0.norm3.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight",
        "down_blocks.0.downsamplers.0.conv.weight",
        "mid_block.resnets.1.conv2.weight",
        "mid_block.attentions.0.proj_out.weight",
        "up_blocks.0.resnets.1.conv_shortcut.weight",
        "up_blocks.0.upsamplers.0.conv.weight",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_v.weight",
        "conv_norm_out.weight",
        "conv_out.bias",
    }
    assert expected <= keys, sorted(expected - keys)
    absent = (
        "time_embedding.cond_proj.bias",  # cond_proj has no bias
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.bias",  # q/k/v have no bias in SD
        "down_blocks.1.downsamplers.0.conv.weight",  # deepest level: no downsampler
        "up_blocks.1.upsamplers.0.conv.weight",  # last stage: no upsampler
        "down_blocks.1.attentions.0.norm.weight",  # level 1 has no attention
        "up_blocks.0.attentions.0.norm.weight",
    )
    assert not keys & set(absent), sorted(keys & set(absent))
    assert not any(k.startswith("time_proj") for k in keys)
    assert len(list(unet.buffers())) == 0  # meta-device build + assign=True loading relies on this
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.shape == (8, 8)
    assert len(unet.up_blocks[1].resnets) == CONFIG.layers_per_block[0] + 1


def test_linear_projection_layout():
    model = UNet2DConditionModel(replace(CONFIG, use_linear_projection=True))
    sd = model.state_dict()
    assert sd["down_blocks.0.attentions.0.proj_in.weight"].shape == (8, 8)  # Linear, not a 1x1 conv
    assert sd["mid_block.attentions.0.proj_out.weight"].shape == (16, 16)


def test_save_and_from_pretrained_round_trip(unet, tmp_path):
    unet.save_pretrained(tmp_path)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path)
    set_conv_prepacking(
        loaded, "off"
    )  # memory-mapped weights would take the packed path: same values to 1e-6
    assert loaded.config == CONFIG
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    torch.testing.assert_close(_run(loaded), _run(unet), atol=0, rtol=0)


def test_timestep_forms_agree(unet):
    """A number, a 0-d tensor, a 1-element tensor and a per-sample tensor of equal values give equal outputs."""
    inputs = _inputs()
    reference = _run(unet, torch.tensor([250, 250]), **inputs)
    for t in (250, 250.0, torch.tensor(250), torch.tensor([250.0])):
        torch.testing.assert_close(_run(unet, t, **inputs), reference, atol=0, rtol=0)


@pytest.mark.parametrize("timestep", [torch.tensor([1, 2, 3]), torch.tensor([[1], [2]])], ids=["len3", "2d"])
def test_bad_timestep_shape_is_a_value_error(unet, timestep):
    with pytest.raises(ValueError, match="timestep must be"):
        _run(unet, timestep)


def test_timestep_cond_needs_cond_proj():
    model = UNet2DConditionModel(replace(CONFIG, time_cond_proj_dim=None)).eval()
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        _run(model)
    inputs = _inputs()
    del inputs["timestep_cond"]
    assert _run(model, **inputs).shape == (2, 4, 8, 8)


def test_odd_sizes_keep_shape_and_dtype(unet):
    """Odd sizes keep their shape; in bfloat16 with FreeU the output stays bfloat16 and within bfloat16 rounding
    (5e-2 on outputs of about 1) of the same weights and inputs run in float32."""
    for size in ((7, 9), (3, 5)):
        assert _run(unet, **_inputs(1, *size)).shape == (1, 4, *size)
    torch.manual_seed(0)
    bf16 = UNet2DConditionModel(CONFIG).eval().to(torch.bfloat16)
    fp32 = copy.deepcopy(bf16).float()
    inputs = {k: v.to(torch.bfloat16) for k, v in _inputs(1, 7, 9).items()}
    for model in (bf16, fp32):
        model.enable_freeu(0.9, 0.2, 1.2, 1.4)
    out = _run(bf16, **inputs)
    assert out.dtype == torch.bfloat16
    expected = _run(fp32, **{k: v.float() for k, v in inputs.items()})
    assert_close_to_reference(out, expected, atol=5e-2, what="bfloat16 UNet sample with FreeU")


def test_output_object_and_tuple(unet):
    inputs = _inputs()
    with torch.no_grad():
        out = unet(sample=inputs["sample"], timestep=3, encoder_hidden_states=inputs["encoder_hidden_states"])
        as_tuple = unet(
            inputs["sample"], 3, inputs["encoder_hidden_states"], return_dict=False, cross_attention_kwargs={}
        )
    assert isinstance(out, UNet2DConditionOutput)
    assert out[0] is out.sample and out["sample"] is out.sample
    torch.testing.assert_close(as_tuple[0], out.sample, atol=0, rtol=0)


def test_freeu_switches(unet, caplog):
    assert all(getattr(b, k) is None for b in unet.up_blocks for k in ("s1", "s2", "b1", "b2"))
    plain = _run(unet)
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert all((b.s1, b.s2, b.b1, b.b2) == (0.9, 0.2, 1.2, 1.4) for b in unet.up_blocks)
    assert (_run(unet) - plain).abs().max() > 1e-3
    with caplog.at_level(logging.WARNING, logger="lcmkit"):
        unet.enable_freeu(s1=0.9, s2=0.2, b1=0.0, b2=1.4)  # a zero factor turns FreeU off, as in diffusers
    assert "zero factor" in caplog.text
    torch.testing.assert_close(_run(unet), plain, atol=0, rtol=0)
    unet.disable_freeu()
    assert all(getattr(b, k) is None for b in unet.up_blocks for k in ("s1", "s2", "b1", "b2"))
    torch.testing.assert_close(_run(unet), plain, atol=0, rtol=0)


def test_mid_block_without_attention_is_rejected():
    with pytest.raises(ConfigError, match="mid_attention"):
        UNet2DConditionModel(replace(CONFIG, mid_attention=False))


def test_fourier_filter_scales_only_the_lowest_frequencies():
    """A constant map has only a DC component, so it is scaled by `scale`; a checkerboard (Nyquist) is untouched."""
    const = torch.full((1, 2, 6, 4), 3.0)
    torch.testing.assert_close(fourier_filter(const, threshold=1, scale=0.25), const * 0.25)
    checker = (torch.arange(6)[:, None] + torch.arange(4)[None, :]) % 2 * 2.0 - 1.0
    checker = checker.expand(1, 2, 6, 4)
    torch.testing.assert_close(fourier_filter(checker, threshold=1, scale=0.25), checker, atol=1e-6, rtol=0)
    x = torch.randn(2, 3, 5, 7, dtype=torch.bfloat16)
    out = fourier_filter(x, threshold=1, scale=1.0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, x, atol=0, rtol=0)


def test_apply_freeu_stages_and_no_mutation():
    h, skip = torch.randn(1, 4, 4, 4), torch.randn(1, 2, 4, 4)
    h_copy, skip_copy = h.clone(), skip.clone()
    h0, s0 = apply_freeu(0, h, skip, s1=0.5, s2=0.2, b1=2.0, b2=3.0)
    torch.testing.assert_close(h0, torch.cat([h[:, :2] * 2.0, h[:, 2:]], dim=1))
    torch.testing.assert_close(s0, fourier_filter(skip, 1, 0.5))
    h1, _ = apply_freeu(1, h, skip, s1=0.5, s2=0.2, b1=2.0, b2=3.0)
    torch.testing.assert_close(h1[:, :2], h[:, :2] * 3.0)
    h2, s2 = apply_freeu(2, h, skip, s1=0.5, s2=0.2, b1=2.0, b2=3.0)
    assert h2 is h and s2 is skip
    assert torch.equal(h, h_copy) and torch.equal(skip, skip_copy)


def test_subpixel_upsampling_where_the_input_is_large(unet, monkeypatch):
    """The up blocks' upsamplers take the sub-pixel form ("auto") from 32x32 inputs on: at 64x64 latents this
    UNet's one upsampler sees 32x32 and does; the output matches the reference form up to float rounding, and
    `disable_subpixel_upsampling()` turns it off. The threshold rule is pinned (`choose="thresholds"`): under the
    default "probe" the choice is this machine's timing (tests/nn/test_probe.py)."""
    from lcmkit.nn import fast
    from lcmkit.runtime import FastPaths

    unet.set_fast_paths(FastPaths(choose="thresholds"))

    calls = []
    real = fast.nearest2x_conv3x3
    monkeypatch.setattr(
        fast, "nearest2x_conv3x3", lambda x, *a, **k: calls.append(x.shape) or real(x, *a, **k)
    )
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 64, 64, generator=g)
    text = torch.randn(1, 5, CONFIG.cross_attention_dim, generator=g)
    cond = torch.randn(1, CONFIG.time_cond_proj_dim, generator=g)
    try:
        with torch.no_grad():
            fast = unet(sample, 10, encoder_hidden_states=text, timestep_cond=cond).sample
            assert calls == [(1, 16, 32, 32)]
            unet(
                sample[..., :32, :32], 10, encoder_hidden_states=text, timestep_cond=cond
            )  # 16x16: reference form
            assert len(calls) == 1
            unet.disable_subpixel_upsampling()
            plain = unet(sample, 10, encoder_hidden_states=text, timestep_cond=cond).sample
            assert len(calls) == 1
    finally:
        unet.set_fast_paths(FastPaths.default())
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
