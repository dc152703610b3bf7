"""Parity of lcmkit's `AutoencoderTiny` (TAESD) with diffusers' `AutoencoderTiny` (the oracle) on the same weights.

The models are built by diffusers under `torch.manual_seed(0)` and copied into ours with strict key checks, so the
state-dict keys and shapes are identical by construction (and asserted). Every output comparison uses atol=1e-5,
rtol=0 in float32 on the CPU; the pipeline comparison uses 1e-4 on images in [0, 1], like the other pipeline
parity tests. Folders written by either library are loaded by the other.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.reference import assert_close_to_reference

diffusers = pytest.importorskip("diffusers")

from lcmkit.models.tiny_vae import AutoencoderTiny, TinyVAEConfig  # noqa: E402

ATOL = 1e-5

CONFIGS = {
    # (a) TAESD's layout (four stages, 8 pixels per latent), narrower and with fewer blocks
    "taesd_small": dict(
        encoder_block_out_channels=[8, 8, 8, 8],
        decoder_block_out_channels=[8, 8, 8, 8],
        num_encoder_blocks=[1, 2, 2, 2],
        num_decoder_blocks=[2, 2, 2, 1],
    ),
    # (b) everything else the config can change: activation, upsampling mode, latent width and storage constants
    "variant": dict(
        encoder_block_out_channels=[6, 6, 6],
        decoder_block_out_channels=[10, 10, 10],
        num_encoder_blocks=[1, 1, 2],
        num_decoder_blocks=[2, 1, 1],
        act_fn="silu",
        upsample_fn="bilinear",
        latent_channels=16,
        latent_magnitude=2,
        latent_shift=0.25,
    ),
}


def _build_pair(name: str) -> tuple[torch.nn.Module, AutoencoderTiny]:
    torch.manual_seed(0)
    ref = diffusers.AutoencoderTiny(**CONFIGS[name]).eval()
    ours = AutoencoderTiny(TinyVAEConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    return _build_pair(request.param)


@pytest.fixture(scope="module")
def taesd_pair():
    return _build_pair("taesd_small")


def _images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_default_taesd_state_dict_keys_and_shapes_are_identical():
    """At the default config (madebyollin/taesd's), both libraries name and shape every tensor the same."""
    torch.manual_seed(0)
    ref = diffusers.AutoencoderTiny()
    with torch.device("meta"):
        ours = AutoencoderTiny(TinyVAEConfig.from_diffusers(dict(ref.config)))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref_shapes
    assert ours.config.block_out_channels == tuple(ref.config.block_out_channels)
    assert ours.config.scaling_factor == ref.config.scaling_factor == 1.0


def test_state_dict_keys_and_shapes_are_identical(pair):
    ref, ours = pair
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()
    }


def test_encode_decode_and_forward_match(pair):
    """encode, decode and the 8-bit round trip agree within 1e-5; outputs are checked to be far from constant."""
    ref, ours = pair
    f = 2 ** (len(ref.config.encoder_block_out_channels) - 1)
    x = _images(2, 5 * f, 7 * f)
    z = torch.randn(2, ref.config.latent_channels, 5, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_latents = ref.encode(x).latents
        assert_close_to_reference(ours.encode(x).latents, expected_latents, atol=ATOL)
        expected_image = ref.decode(z).sample
        assert expected_image.std() > 1e-3
        assert_close_to_reference(ours.decode(z).sample, expected_image, atol=ATOL)
        assert_close_to_reference(ours(x).sample, ref(x).sample, atol=ATOL)
        assert_close_to_reference(ours.scale_latents(z), ref.scale_latents(z), atol=ATOL)
        assert_close_to_reference(ours.unscale_latents(z), ref.unscale_latents(z), atol=ATOL)


def test_sliced_and_tiled_runs_match(taesd_pair):
    """Slicing, tiling, and both together (small tiles, 3x3 and 2x3 grids with partial edge tiles) agree."""
    ref, ours = taesd_pair
    x = _images(2, 72, 56, seed=2)
    z = torch.randn(2, 4, 9, 7, generator=torch.Generator().manual_seed(3))
    try:
        for model in (ref, ours):
            model.tile_sample_min_size = 32
            model.tile_latent_min_size = 4
        for slicing, tiling in ((True, False), (False, True), (True, True)):
            for model in (ref, ours):
                model.use_slicing, model.use_tiling = slicing, tiling
            with torch.no_grad():
                assert_close_to_reference(ours.encode(x).latents, ref.encode(x).latents, atol=ATOL)
                assert_close_to_reference(ours.decode(z).sample, ref.decode(z).sample, atol=ATOL)
    finally:
        for model in (ref, ours):
            model.use_slicing = model.use_tiling = False
            model.tile_sample_min_size, model.tile_latent_min_size = 512, 64


def test_folders_load_both_ways(pair, tmp_path):
    """Ours saved -> diffusers loads it (same config, same outputs); diffusers saved -> ours loads it strictly."""
    ref, ours = pair
    z = torch.randn(1, ref.config.latent_channels, 4, 6, generator=torch.Generator().manual_seed(4))
    ours.save_pretrained(tmp_path / "ours")
    ref_loaded = diffusers.AutoencoderTiny.from_pretrained(tmp_path / "ours").eval()
    for key in CONFIGS_KEYS:
        assert _plain(ref_loaded.config[key]) == _plain(ref.config[key]), key
    ref.save_pretrained(tmp_path / "ref")
    ours_loaded = AutoencoderTiny.from_pretrained(tmp_path / "ref")
    assert ours_loaded.config == ours.config
    with torch.no_grad():
        expected = ref.decode(z).sample
        assert_close_to_reference(ref_loaded.decode(z).sample, expected, atol=ATOL)
        assert_close_to_reference(ours_loaded.decode(z).sample, expected, atol=ATOL)


CONFIGS_KEYS = (
    "in_channels",
    "out_channels",
    "encoder_block_out_channels",
    "decoder_block_out_channels",
    "act_fn",
    "upsample_fn",
    "latent_channels",
    "upsampling_scaling_factor",
    "num_encoder_blocks",
    "num_decoder_blocks",
    "latent_magnitude",
    "latent_shift",
    "force_upcast",
    "scaling_factor",
    "shift_factor",
    "block_out_channels",
)


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def test_lcm_pipeline_with_tiny_vae_matches_diffusers(taesd_pair, tmp_path):
    """Both libraries' LCM pipelines, loaded from one tiny folder, with the same TAESD-layout VAE swapped in,
    give the same 64x48 image within 1e-4 (so the scale factor, the latent scaling and the decode all agree)."""
    import lcmkit
    from lcmkit.tiny import build_tiny_lcm

    ref_vae, our_vae = taesd_pair
    folder = build_tiny_lcm(tmp_path / "lcm")
    ours = lcmkit.LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None)
    ours.vae = our_vae  # assigned after loading: our scale factor follows the current vae
    # diffusers fixes its vae_scale_factor in __init__, so there the VAE has to be passed at load time
    ref = diffusers.LatentConsistencyModelPipeline.from_pretrained(folder, vae=ref_vae, safety_checker=None)
    images = []
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
        images.append(
            pipe(
                "a cat",
                height=64,
                width=48,
                num_inference_steps=2,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            ).images
        )
    assert images[0].shape == images[1].shape == (1, 64, 48, 3)
    assert float(np.abs(images[0] - images[1]).max()) <= 1e-4
