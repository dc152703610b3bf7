"""Parity of lcmkit's `AutoencoderKL` with diffusers' `AutoencoderKL` (the oracle) on the same tiny random weights.

Every comparison uses atol=3e-5, rtol=0 in float32 on the CPU: lcmkit's VAE runs channels-last there by default
(`set_memory_format("auto")`), whose convolutions sum in another order than diffusers' NCHW ones (largest
difference seen: 1.03e-5, a sliced batch decode). Models are built by diffusers under
`torch.manual_seed(0)`; the GroupNorm affine parameters (initialised to 1/0) are then randomised too, so that a
norm applied in the wrong place, or with the wrong epsilon, changes the output by far more than the tolerance.
"""

from __future__ import annotations

import pytest
import torch
from helpers.reference import assert_close_to_reference
from helpers.tiny_models import DIFFUSERS_SMALL_VAE

diffusers = pytest.importorskip("diffusers")

from lcmkit.config import VAEConfig  # noqa: E402
from lcmkit.models.vae import AutoencoderKL  # noqa: E402
from lcmkit.nn import ResnetBlock2D  # noqa: E402
from lcmkit.nn.conv import set_conv_winograd, winograd_available  # noqa: E402

ATOL = 3e-5

CONFIGS = {
    # (a) the VAE of diffusers' LCM fast pipeline tests
    "lcm_fast": DIFFUSERS_SMALL_VAE,
    # (b) three levels, two resnets per encoder level (three per decoder level)
    "three_level": dict(
        block_out_channels=[8, 16, 16],
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ),
    # (c) no quant convs, no mid-block attention
    "bare": dict(
        block_out_channels=[4, 8],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    ),
}


def _build_pair(name: str) -> tuple[torch.nn.Module, AutoencoderKL]:
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**CONFIGS[name]).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=gen))
    ours = AutoencoderKL(VAEConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    return _build_pair(request.param)


@pytest.fixture(scope="module")
def lcm_pair():
    return _build_pair("lcm_fast")


def _count_calls(module: torch.nn.Module) -> list[tuple[int, ...]]:
    """Record the input shape of every call of `module` (its hook stays for the module's life: use fresh models)."""
    shapes: list[tuple[int, ...]] = []
    module.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape)))
    return shapes


def test_state_dict_keys_and_shapes_match(pair):
    """Same checkpoint layout: identical key sets and shapes, so diffusers weights load strictly, with no renaming."""
    ref, ours = pair
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert set(ref_sd) == set(our_sd)
    assert {k: tuple(v.shape) for k, v in ref_sd.items()} == {k: tuple(v.shape) for k, v in our_sd.items()}


@torch.no_grad()
def test_encode_decode_match(pair):
    """Untiled encode (mean, logvar, std, mode, seeded sample) and decode match diffusers within 1e-5."""
    ref, ours = pair
    x = torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    d_ref, d_ours = ref.encode(x).latent_dist, ours.encode(x).latent_dist
    assert_close_to_reference(d_ours.mean, d_ref.mean, atol=ATOL)
    assert_close_to_reference(d_ours.logvar, d_ref.logvar, atol=ATOL)
    assert_close_to_reference(d_ours.std, d_ref.std, atol=ATOL)
    assert_close_to_reference(d_ours.mode(), d_ref.mode(), atol=ATOL)
    s_ref = d_ref.sample(generator=torch.Generator().manual_seed(3))
    s_ours = d_ours.sample(generator=torch.Generator().manual_seed(3))
    assert_close_to_reference(s_ours, s_ref, atol=ATOL)
    gens = [torch.Generator().manual_seed(s) for s in (4, 5)]
    s_ref = d_ref.sample(generator=gens)
    gens = [torch.Generator().manual_seed(s) for s in (4, 5)]
    assert_close_to_reference(d_ours.sample(generator=gens), s_ref, atol=ATOL)

    z = s_ref
    assert_close_to_reference(ours.decode(z).sample, ref.decode(z).sample, atol=ATOL)
    assert_close_to_reference(
        ours.decode(z, return_dict=False)[0], ref.decode(z, return_dict=False)[0], atol=ATOL
    )


@torch.no_grad()
def test_forward_matches(lcm_pair):
    """`forward` with the posterior mode and with a seeded posterior sample matches diffusers."""
    ref, ours = lcm_pair
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(6)) * 2 - 1
    assert_close_to_reference(ours(x).sample, ref(x).sample, atol=ATOL)
    out_ref = ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(7)).sample
    out_ours = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(7)).sample
    assert_close_to_reference(out_ours, out_ref, atol=ATOL)


@pytest.mark.skipif(not winograd_available(), reason="NNPACK is not usable on this CPU/build")
@torch.no_grad()
def test_winograd_convolutions_match(pair, monkeypatch):
    """With every eligible 3x3 conv on the Winograd path (at SD sizes only large maps take it), encode and decode
    (a batch of 2: one NNPACK call per sample) still match diffusers, at the pipelines' 1e-4."""
    ref, ours = pair
    calls = []
    real = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", lambda *a: calls.append(1) or real(*a))
    x = torch.rand(2, 3, 32, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    z = torch.randn(2, 4, 12, 10, generator=torch.Generator().manual_seed(3))
    set_conv_winograd(ours, "always")
    try:
        mean, image = ours.encode(x).latent_dist.mean, ours.decode(z).sample
    finally:
        set_conv_winograd(ours, "auto")
    resnets = sum(isinstance(m, ResnetBlock2D) for m in ours.modules())
    assert len(calls) == 2 * 2 * resnets  # both convs of every resnet, once per sample
    assert_close_to_reference(mean, ref.encode(x).latent_dist.mean, atol=1e-4)
    assert_close_to_reference(image, ref.decode(z).sample, atol=1e-4)


@torch.no_grad()
def test_slicing_matches(pair):
    """Sliced encode/decode of a batch of 3 equals diffusers' sliced and our unsliced outputs."""
    ref, ours = pair
    x = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(8)) * 2 - 1
    z = torch.randn(3, 4, 12, 12, generator=torch.Generator().manual_seed(9))
    whole_mean, whole_image = ours.encode(x).latent_dist.mean, ours.decode(z).sample
    ref.enable_slicing()
    ours.enable_slicing()
    try:
        assert_close_to_reference(ours.encode(x).latent_dist.mean, ref.encode(x).latent_dist.mean, atol=ATOL)
        assert_close_to_reference(ours.decode(z).sample, ref.decode(z).sample, atol=ATOL)
        assert_close_to_reference(ours.encode(x).latent_dist.mean, whole_mean, atol=ATOL)
        assert_close_to_reference(ours.decode(z).sample, whole_image, atol=ATOL)
    finally:
        ref.disable_slicing()
        ours.disable_slicing()


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_tiled_encode_decode_match(name):
    """Tiled encode (80x56 image) and tiled decode (latents of the same area) equal diffusers' tiled outputs.

    Tile sizes 32 px / 32 / f latents: several tiles in each direction, ragged edge tiles, and the in-place
    blend order all take part. We also check that tiling really happened (more than one tile) and that each
    encoder/decoder call saw one tile at most.
    """
    ref, ours = _build_pair(name)
    f = ours.vae_scale_factor
    assert ours.tile_sample_min_size == ref.tile_sample_min_size == 32
    assert ours.tile_latent_min_size == ref.tile_latent_min_size == 32 // f
    enc_calls, dec_calls = _count_calls(ours.encoder), _count_calls(ours.decoder)
    ref.enable_tiling()
    ours.enable_tiling()

    x = torch.rand(1, 3, 80, 56, generator=torch.Generator().manual_seed(10)) * 2 - 1
    d_ref, d_ours = ref.encode(x).latent_dist, ours.encode(x).latent_dist
    assert_close_to_reference(d_ours.mean, d_ref.mean, atol=ATOL)
    assert_close_to_reference(d_ours.logvar, d_ref.logvar, atol=ATOL)
    assert len(enc_calls) > 1
    assert all(s[-2] <= 32 and s[-1] <= 32 for s in enc_calls)

    z = torch.randn(1, 4, 80 // f, 56 // f, generator=torch.Generator().manual_seed(11))
    assert_close_to_reference(ours.decode(z).sample, ref.decode(z).sample, atol=ATOL)
    assert len(dec_calls) > 1
    assert all(s[-2] <= 32 // f and s[-1] <= 32 // f for s in dec_calls)

    # the untiled result is genuinely different (so the comparison above exercised the tiled path)
    ours.disable_tiling()
    assert (ours.decode(z).sample - ref.decode(z).sample).abs().max() > 1e-4


@pytest.mark.parametrize("shape", [(1, 4, 13, 19), (1, 4, 73, 97), (1, 4, 65, 49)])
@torch.no_grad()
def test_tiled_decode_odd_shapes(lcm_pair, shape):
    """Odd latent shapes (as in diffusers' generic tiling test) do not crash and match diffusers' tiled decode."""
    ref, ours = lcm_pair
    ref.enable_tiling()
    ours.enable_tiling()
    try:
        z = torch.randn(*shape, generator=torch.Generator().manual_seed(12))
        out = ours.decode(z).sample
        assert out.shape == (shape[0], 3, shape[2] * 2, shape[3] * 2)
        assert_close_to_reference(out, ref.decode(z).sample, atol=ATOL)
    finally:
        ref.disable_tiling()
        ours.disable_tiling()


@torch.no_grad()
def test_tiling_with_changed_attributes_matches(lcm_pair):
    """User-changed tile sizes and overlap factor, with slicing on as well, still match diffusers."""
    ref, ours = lcm_pair
    for m in (ref, ours):
        m.enable_tiling()
        m.enable_slicing()
        m.tile_sample_min_size, m.tile_latent_min_size, m.tile_overlap_factor = 24, 12, 0.5
    try:
        x = torch.rand(2, 3, 50, 38, generator=torch.Generator().manual_seed(13)) * 2 - 1
        assert_close_to_reference(ours.encode(x).latent_dist.mean, ref.encode(x).latent_dist.mean, atol=ATOL)
        z = torch.randn(2, 4, 25, 31, generator=torch.Generator().manual_seed(14))
        assert_close_to_reference(ours.decode(z).sample, ref.decode(z).sample, atol=ATOL)
    finally:
        for m in (ref, ours):
            m.disable_tiling()
            m.disable_slicing()
            m.tile_sample_min_size, m.tile_latent_min_size, m.tile_overlap_factor = 32, 16, 0.25


@pytest.mark.parametrize("name", ["lcm_fast", "bare"])
@torch.no_grad()
def test_folder_round_trips(tmp_path, name):
    """diffusers `save_pretrained` -> our `from_pretrained`, and ours -> diffusers, give the same weights and outputs."""
    ref, _ = _build_pair(name)
    ref.save_pretrained(tmp_path / "from_diffusers")
    ours = AutoencoderKL.from_pretrained(tmp_path / "from_diffusers")
    assert ours.config == VAEConfig.from_diffusers(dict(ref.config))
    ref_sd = ref.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k

    ours.save_pretrained(tmp_path / "from_lcmkit")
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "from_lcmkit").eval()
    back_sd = back.state_dict()
    assert set(back_sd) == set(ref_sd)
    for k, v in ref_sd.items():
        assert torch.equal(back_sd[k], v), k
    for key in ("block_out_channels", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        assert back.config[key] == ref.config[key]

    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(15)) * 2 - 1
    assert_close_to_reference(ours(x).sample, ref(x).sample, atol=ATOL)
    assert_close_to_reference(back(x).sample, ref(x).sample, atol=ATOL)
