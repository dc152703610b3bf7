"""Unit tests of lcmkit's `AutoencoderKL` on its own (parity with diffusers lives in tests/parity/test_vae_parity.py).

They pin down the parts whose exact arithmetic the parity tests rely on (the tile blend, the posterior) against
formulas written out here, and the contracts around them: slicing, tiling bookkeeping, meta-device loading.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers.tiny_models import SMALL_VAE as TINY

from lcmkit.config import VAEConfig
from lcmkit.models.vae import AutoencoderKL, DiagonalGaussianDistribution, _blend
from lcmkit.nn.conv import set_conv_winograd, winograd_available
from lcmkit.runtime import FastPaths


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(TINY).eval()


def _blend_rowwise(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """The blend formula of spec §4, one row/column at a time with Python-float weights."""
    e = min(a.shape[dim], b.shape[dim], extent)
    for k in range(e):
        mixed = a.select(dim, a.shape[dim] - e + k) * (1 - k / e) + b.select(dim, k) * (k / e)
        b.select(dim, k).copy_(mixed)
    return b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("extent", [0, 1, 5, 16, 40])
def test_blend_is_bit_identical_to_rowwise_formula(dtype, dim, extent):
    """The vectorised blend equals the row-by-row formula bit for bit (every dtype), is in place, and clips the extent."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 20, 24, generator=g).to(dtype)
    b = torch.randn(2, 3, *((18, 24) if dim == 2 else (20, 22)), generator=g).to(dtype)
    expected = _blend_rowwise(a, b.clone(), extent, dim)
    out = _blend(a, b, extent, dim)
    assert out is b
    assert torch.equal(out, expected)


def test_blend_methods_pick_the_axis(vae):
    a, b = torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    v = vae.blend_v(a, b.clone(), 2)
    assert torch.equal(v[0, 0, :, 0], torch.tensor([1.0, 0.5, 0.0, 0.0]))
    h = vae.blend_h(a, b.clone(), 2)
    assert torch.equal(h[0, 0, 0, :], torch.tensor([1.0, 0.5, 0.0, 0.0]))


def test_posterior_halves_clamp_sample_and_mode():
    """mean/logvar are the channel halves, logvar is clamped to [-30, 20], sample = mean + exp(logvar/2) * randn."""
    params = torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(0))
    params[0, 4, 0, 0], params[0, 5, 0, 0] = 100.0, -100.0
    dist = DiagonalGaussianDistribution(params)
    assert torch.equal(dist.mean, params[:, :4])
    assert torch.equal(dist.mode(), params[:, :4])
    assert dist.logvar[0, 0, 0, 0] == 20.0 and dist.logvar[0, 1, 0, 0] == -30.0
    assert torch.equal(dist.std, torch.exp(0.5 * dist.logvar))
    eps = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(dist.sample(torch.Generator().manual_seed(1)), dist.mean + dist.std * eps)
    assert dist.kl().shape == (2,)
    assert torch.equal(DiagonalGaussianDistribution(params, deterministic=True).sample(), dist.mean)


def test_tile_defaults_follow_the_config():
    assert AutoencoderKL(TINY).vae_scale_factor == 2
    three = AutoencoderKL(VAEConfig(block_out_channels=(8, 16, 16), norm_num_groups=4, sample_size=32))
    assert three.vae_scale_factor == 4
    assert (three.tile_sample_min_size, three.tile_latent_min_size, three.tile_overlap_factor) == (
        32,
        8,
        0.25,
    )
    assert not three.use_slicing and not three.use_tiling
    three.enable_slicing()
    three.enable_tiling()
    assert three.use_slicing and three.use_tiling
    three.disable_slicing()
    three.disable_tiling()
    assert not three.use_slicing and not three.use_tiling


def test_optional_modules_and_keys():
    """quant convs and the mid attention exist only when the config asks for them (no keys otherwise)."""
    keys = set(AutoencoderKL(TINY).state_dict())
    assert {
        "quant_conv.weight",
        "post_quant_conv.weight",
        "decoder.mid_block.attentions.0.to_q.weight",
    } <= keys
    assert "encoder.down_blocks.0.downsamplers.0.conv.weight" in keys
    assert "encoder.down_blocks.1.downsamplers.0.conv.weight" not in keys
    assert "decoder.up_blocks.0.upsamplers.0.conv.weight" in keys
    assert "decoder.up_blocks.0.resnets.1.conv1.weight" in keys  # layers_per_block + 1 in the decoder
    bare = VAEConfig(
        block_out_channels=(4, 8),
        norm_num_groups=2,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )
    bare_keys = set(AutoencoderKL(bare).state_dict())
    assert not any(k.startswith(("quant_conv", "post_quant_conv")) or "attentions" in k for k in bare_keys)


def test_builds_on_meta_device():
    """from_pretrained builds on the meta device and assigns weights: the model must hold parameters only."""
    with torch.device("meta"):
        model = AutoencoderKL(TINY)
    assert len(list(model.buffers())) == 0
    assert all(p.is_meta for p in model.parameters())


@torch.no_grad()
def test_shapes_and_output_forms(vae):
    x = torch.rand(2, 3, 24, 16) * 2 - 1
    out = vae.encode(x)
    assert out.latent_dist.mean.shape == (2, 4, 12, 8)
    (dist,) = vae.encode(x, return_dict=False)
    assert torch.equal(dist.mean, out.latent_dist.mean)
    assert out[0] is out.latent_dist
    image = vae.decode(dist.mean).sample
    assert image.shape == (2, 3, 24, 16)
    assert torch.equal(vae.decode(dist.mean, return_dict=False)[0], image)
    assert torch.equal(vae(x).sample, image)
    with pytest.raises(ValueError, match="batch, channels, height, width"):
        vae.decode(dist.mean[0])


@torch.no_grad()
def test_slicing_equals_unsliced(vae):
    """Slicing runs one sample at a time; for a batch of 3 the results equal the batched ones within 1e-5."""
    x = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    z = torch.randn(3, 4, 12, 12, generator=torch.Generator().manual_seed(3))
    mean, image = vae.encode(x).latent_dist.mean, vae.decode(z).sample
    vae.enable_slicing()
    try:
        torch.testing.assert_close(vae.encode(x).latent_dist.mean, mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(vae.decode(z).sample, image, atol=1e-5, rtol=0)
    finally:
        vae.disable_slicing()


@torch.no_grad()
def test_tiling_grid_and_thresholds():
    """Tiling starts only above the tile size (strict `>`), visits the stride grid one tile at a time, and
    assembles an output of the untiled shape. At or below the tile size the result is the untiled one."""
    torch.manual_seed(0)
    model = AutoencoderKL(TINY).eval()
    calls: list[tuple[int, ...]] = []
    model.decoder.register_forward_pre_hook(lambda _m, args: calls.append(tuple(args[0].shape)))
    z = torch.randn(1, 4, 16, 16)
    untiled = model.decode(z).sample
    model.enable_tiling()
    calls.clear()
    assert torch.equal(model.decode(z).sample, untiled)
    assert calls == [(1, 4, 16, 16)]

    calls.clear()
    out = model.decode(torch.randn(1, 4, 13, 19)).sample
    # stride int(16 * 0.75) = 12: rows at 0, 12 (heights 13 -> 13, 1), columns at 0, 12 (16, 7)
    assert calls == [(1, 4, 13, 16), (1, 4, 13, 7), (1, 4, 1, 16), (1, 4, 1, 7)]
    assert out.shape == (1, 3, 26, 38)

    model.tile_overlap_factor = 1.0
    with pytest.raises(ValueError, match="stride"):
        model.decode(torch.randn(1, 4, 20, 20))


@torch.no_grad()
def test_save_and_load_round_trip(tmp_path, vae):
    vae.save_pretrained(tmp_path)
    loaded = AutoencoderKL.from_pretrained(tmp_path)
    assert loaded.config == vae.config
    z = torch.randn(1, 4, 8, 8)
    assert torch.equal(loaded.decode(z).sample, vae.decode(z).sample)


@pytest.mark.parametrize("mode", ["auto", "channels_last", "contiguous"])
def test_memory_format_modes(vae, mode):
    """Every layout gives the same encode/decode up to float rounding and plain NCHW outputs; "auto" runs
    channels-last on the CPU in float32 only (seen by a hook inside the decoder and the encoder). The threshold rule
    is pinned: under the default "probe" each level's layout is this machine's timing."""
    vae.set_fast_paths(FastPaths(choose="thresholds"))
    seen = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))
        for m in (
            vae.decoder.mid_block,
            vae.decoder.mid_block.resnets[
                1
            ],  # after the attention, which returns the map in its input's layout
            vae.decoder.up_blocks[-1],
            vae.encoder.down_blocks[1],
        )
    ]
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(2))
    try:
        with torch.no_grad():
            vae.set_memory_format("contiguous")
            ref = vae.decode(z).sample, vae.encode(x).latent_dist.mean
            if mode == "channels_last":  # forced channels-last leaves no level for Winograd: turned off first
                vae.set_fast_paths(replace(vae.fast_paths, conv_winograd="off"))
            vae.set_memory_format(mode)
            seen.clear()
            out = vae.decode(z).sample, vae.encode(x).latent_dist.mean
            assert seen == [mode == "contiguous"] * 4
            for a, b in zip(out, ref, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
            assert out[0].is_contiguous() and vae.encoder(x).is_contiguous()
            seen.clear()
            vae.double().decode(z.double())  # "auto" keeps float64 (and other dtypes, other devices) NCHW
            assert seen == [mode != "channels_last"] * 3
    finally:
        vae.float().set_fast_paths(FastPaths.default())
        for h in hooks:
            h.remove()


def test_memory_format_rejects_unknown_modes(vae):
    with pytest.raises(ValueError, match="channels_last"):
        vae.set_memory_format("nhwc")


@pytest.mark.skipif(not winograd_available(), reason="NNPACK is not usable on this CPU/build")
def test_levels_taking_winograd_run_nchw_and_the_rest_channels_last():
    """ "auto" layout with the Winograd path on one level only: that level's resnets (and the upsampler feeding it,
    converted before upsampling) see plain NCHW maps, every other level channels-last; images as with no Winograd
    up to its rounding; outputs plain NCHW. In the encoder the level is converted after the downsampler. The
    threshold rule is pinned: under the default "probe" each level's layout is this machine's timing."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        VAEConfig(block_out_channels=(4, 8, 8), latent_channels=4, norm_num_groups=2, sample_size=32)
    ).eval()
    vae.set_fast_paths(FastPaths(choose="thresholds"))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        plain = vae.decode(z).sample, vae.encode(x).latent_dist.mean
    seen: dict[str, bool] = {}

    def watch(name: str, module: torch.nn.Module) -> None:
        module.register_forward_pre_hook(lambda _m, args: seen.__setitem__(name, args[0].is_contiguous()))

    dec, enc = vae.decoder, vae.encoder
    for i, block in enumerate(dec.up_blocks):
        watch(f"up{i}", block.resnets[0])
        if block.upsamplers is not None:
            watch(f"up{i}.upsampler", block.upsamplers[0])
    for i, block in enumerate(enc.down_blocks):
        watch(f"down{i}", block.resnets[0])
    set_conv_winograd(dec.up_blocks[1], "always")
    set_conv_winograd(enc.down_blocks[1], "always")
    with torch.no_grad():
        out = vae.decode(z).sample, vae.encode(x).latent_dist.mean
    assert seen == {
        "up0": False,
        "up0.upsampler": True,  # converted for level 1 before upsampling
        "up1": True,
        "up1.upsampler": False,  # back to channels-last for level 2
        "up2": False,
        "down0": False,
        "down1": True,
        "down2": False,
    }
    for a, b in zip(out, plain, strict=True):
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with pytest.raises(
        ValueError, match="conv_winograd"
    ):  # channels-last would silently drop the Winograd levels
        vae.set_memory_format("channels_last")
    vae.set_fast_paths(FastPaths(vae_memory_format="channels_last", conv_winograd="off"))
    seen.clear()
    with torch.no_grad():
        vae.decode(z), vae.encode(x)
    assert len(seen) == 8 and not any(seen.values())
