"""lcmkit's `ControlNetModel` on its own (no diffusers): its config round trip, what its options do, the UNet's
residual inputs, and input checks. Parity with diffusers: tests/parity/test_controlnet_parity.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers.tiny_models import SMALL_UNET

from lcmkit.config import ConfigError, ControlNetConfig, UNetConfig
from lcmkit.models.controlnet import ControlNetModel
from lcmkit.models.unet import UNet2DConditionModel

TRUNK = {f.name: getattr(SMALL_UNET, f.name) for f in dataclasses.fields(UNetConfig)}
CONFIG = ControlNetConfig(**{**TRUNK, "time_cond_proj_dim": None}, conditioning_embedding_out_channels=(4, 8))


def inputs(batch: int = 2) -> dict:
    gen = torch.Generator().manual_seed(0)
    return dict(
        sample=torch.randn(batch, 4, 8, 8, generator=gen),
        timestep=torch.tensor(400),
        encoder_hidden_states=torch.randn(batch, 5, 12, generator=gen),
        controlnet_cond=torch.rand(batch, 3, 16, 16, generator=gen),
    )


def net(config: ControlNetConfig = CONFIG) -> ControlNetModel:
    torch.manual_seed(0)
    return ControlNetModel(config).eval()


def test_config_round_trip_and_residual_layout():
    # diffusers' ControlNet config has no sample_size (the read keeps the default)
    assert ControlNetConfig.from_diffusers(CONFIG.to_diffusers()) == dataclasses.replace(
        CONFIG, sample_size=64
    )
    model = net()
    with torch.no_grad():
        down, mid = model(**inputs(), return_dict=False)
    # conv_in + 1 resnet per level + 1 downsampler between the two levels
    assert [tuple(d.shape[1:]) for d in down] == [(8, 8, 8), (8, 8, 8), (8, 4, 4), (16, 4, 4)]
    assert tuple(mid.shape) == (2, 16, 4, 4) and model.num_residuals == 4
    with torch.no_grad():
        half, half_mid = model(**inputs(), conditioning_scale=0.5, return_dict=False)
    assert torch.allclose(half_mid, 0.5 * mid) and all(
        torch.allclose(h, 0.5 * d) for h, d in zip(half, down, strict=True)
    )


def test_channel_order_global_pool_and_w_embedding():
    base = net()
    bgr = net(dataclasses.replace(CONFIG, conditioning_channel_order="bgr"))
    pooled = net(dataclasses.replace(CONFIG, global_pool_conditions=True))
    x = inputs()
    with torch.no_grad():
        _, mid = base(**x, return_dict=False)
        _, mid_bgr = bgr(**{**x, "controlnet_cond": x["controlnet_cond"].flip(1)}, return_dict=False)
        _, mid_pooled = pooled(**x, return_dict=False)
    assert torch.allclose(mid, mid_bgr, atol=1e-6)  # bgr flips the image back to rgb
    assert torch.allclose(mid_pooled, mid.mean(dim=(2, 3), keepdim=True), atol=1e-6)
    lcm = net(dataclasses.replace(CONFIG, time_cond_proj_dim=6))
    w = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, a = lcm(**x, timestep_cond=w, return_dict=False)
        _, b = lcm(**x, return_dict=False)
        _, c = base(**x, timestep_cond=w, return_dict=False)  # no cond_proj: the w-embedding is not read
    assert (a - b).abs().max() > 1e-4 and torch.equal(c, mid)


def test_bad_input_and_config():
    with pytest.raises(ValueError, match="guess_mode=True is not supported"):
        net()(**inputs(), guess_mode=True)
    with pytest.raises(ConfigError, match="same number of resnets on every level"):
        dataclasses.replace(CONFIG, layers_per_block=(1, 2))
    with pytest.raises(ConfigError, match="controlnet_conditioning_channel_order"):
        dataclasses.replace(CONFIG, conditioning_channel_order="gbr")
    with pytest.raises(ConfigError, match="ControlNetModel"):
        ControlNetConfig.from_diffusers({"_class_name": "UNet2DConditionModel"})


def test_unet_adds_the_residuals_and_checks_their_count():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(SMALL_UNET).eval()
    x = inputs()
    w = torch.randn(2, 6, generator=torch.Generator().manual_seed(2))
    args = (x["sample"], x["timestep"], x["encoder_hidden_states"])
    with torch.no_grad():
        down, mid = net()(**x, return_dict=False)
        plain = unet(*args, timestep_cond=w).sample
        zeros = unet(*args, timestep_cond=w, down_block_additional_residuals=[torch.zeros_like(d) for d in down],
                     mid_block_additional_residual=torch.zeros_like(mid)).sample  # fmt: skip
        steered = unet(*args, timestep_cond=w, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid).sample  # fmt: skip
        mid_only = unet(*args, timestep_cond=w, mid_block_additional_residual=mid).sample
    assert torch.equal(zeros, plain)  # residuals of zero change nothing
    assert (steered - plain).abs().max() > 1e-3 and (mid_only - plain).abs().max() > 1e-4
    assert (steered - mid_only).abs().max() > 1e-4
    with pytest.raises(ValueError, match="3 tensors; this UNet has 4 skip connections"):
        unet(*args, timestep_cond=w, down_block_additional_residuals=down[:3])
