"""Unit tests of lcmkit's `AutoencoderTiny` (TAESD) on its own; parity with diffusers is in
tests/parity/test_tiny_vae_parity.py.

They pin down what the parity tests do not: the TAESD checkpoint key layout at the default config, config
validation and round trips, the tile-pasting bookkeeping against formulas written out here, slicing, meta-device
loading, and that a pipeline takes the tiny VAE as a drop-in `vae`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.reference import assert_close_to_reference
from helpers.tiny_models import TAESD_8_ONE_BLOCK as SMALL

from lcmkit.config import ConfigError
from lcmkit.models.tiny_vae import AutoencoderTiny, TinyVAEConfig, _paste_tiles


@pytest.fixture(scope="module")
def vae() -> AutoencoderTiny:
    torch.manual_seed(0)
    return AutoencoderTiny(SMALL).eval()


def diffusers_twin(model: AutoencoderTiny):
    """diffusers' AutoencoderTiny built from `model`'s config and holding its exact weights: the reference."""
    diffusers = pytest.importorskip("diffusers")

    # block_out_channels is the pipelines' alias of the decoder's widths, not a constructor argument
    skip = {"_class_name", "block_out_channels"}
    config = {k: v for k, v in model.config.to_diffusers().items() if k not in skip}
    ref = diffusers.AutoencoderTiny(**config).eval()
    ref.load_state_dict(model.state_dict())
    return ref


def test_default_config_has_the_taesd_checkpoint_layout():
    """The default model has exactly the `madebyollin/taesd` key layout: 15 encoder and 19 decoder `layers`
    entries, bias-free stride-2 and upsampling convs, a bias on the encoder's and decoder's last conv."""
    with torch.device("meta"):
        model = AutoencoderTiny(TinyVAEConfig())
    sd = model.state_dict()
    assert len(model.encoder.layers) == 15 and len(model.decoder.layers) == 19
    assert tuple(sd["encoder.layers.0.weight"].shape) == (64, 3, 3, 3)
    assert "encoder.layers.2.bias" not in sd and tuple(sd["encoder.layers.2.weight"].shape) == (64, 64, 3, 3)
    assert tuple(sd["encoder.layers.14.weight"].shape) == (4, 64, 3, 3) and "encoder.layers.14.bias" in sd
    assert tuple(sd["encoder.layers.1.conv.4.weight"].shape) == (64, 64, 3, 3)
    assert tuple(sd["decoder.layers.0.weight"].shape) == (64, 4, 3, 3)
    assert (
        "decoder.layers.6.bias" not in sd and "decoder.layers.6.weight" in sd
    )  # conv after the first upsampling
    assert tuple(sd["decoder.layers.18.weight"].shape) == (3, 64, 3, 3) and "decoder.layers.18.bias" in sd
    assert sum(p.numel() for p in model.encoder.parameters()) == 1_222_532  # TAESD's published encoder size
    assert sum(p.numel() for p in model.decoder.parameters()) == 1_222_531


def test_config_round_trip_and_pipeline_aliases():
    """to_diffusers/from_diffusers round-trip; `block_out_channels` is the decoder's, so a pipeline's
    `2 ** (len(block_out_channels) - 1)` is 8 for TAESD; TAESD's scaling factor is 1."""
    cfg = TinyVAEConfig(latent_channels=16, act_fn="silu", upsample_fn="bilinear", latent_magnitude=2.5)
    assert TinyVAEConfig.from_diffusers(cfg.to_diffusers()) == cfg
    assert TinyVAEConfig().block_out_channels == (64, 64, 64, 64)
    assert 2 ** (len(TinyVAEConfig().block_out_channels) - 1) == 8
    assert TinyVAEConfig().scaling_factor == 1.0 and TinyVAEConfig().force_upcast is False
    assert TinyVAEConfig.from_diffusers({"shift_factor": None}).shift_factor == 0.0


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(encoder_block_out_channels=(8, 16, 16, 16)), "must all be equal"),
        (dict(num_decoder_blocks=(1, 1, 1)), "same, non-zero number"),
        (dict(act_fn="tanh"), "act_fn 'tanh' is not supported"),
        (dict(upsample_fn="area"), "upsample_fn 'area'"),
        (dict(upsampling_scaling_factor=0), "positive int"),
    ],
)
def test_config_rejects_what_it_cannot_build(changes, match):
    with pytest.raises(ConfigError, match=match):
        TinyVAEConfig(**changes)


def test_config_refuses_another_class():
    with pytest.raises(ConfigError, match="'AutoencoderKL', not 'AutoencoderTiny'"):
        TinyVAEConfig.from_diffusers({"_class_name": "AutoencoderKL", "block_out_channels": [128, 256]})


def test_encode_decode_match_diffusers_and_latent_storage(vae):
    """8 pixels per latent both ways, with the values of diffusers' AutoencoderTiny holding the same weights
    (<= 1e-5); scale/unscale invert each other inside [0, 1]; forward equals decode of the 8-bit-rounded latents."""
    ref = diffusers_twin(vae)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 48, 40, generator=g) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latents
        assert z.shape == (2, 4, 6, 5)
        assert_close_to_reference(z, ref.encode(x).latents, atol=1e-5, what="latents")
        image = vae.decode(z).sample
        assert image.shape == (2, 3, 48, 40)
        assert_close_to_reference(image, ref.decode(z).sample, atol=1e-5, what="decoded image")
        wide = torch.randn(2, 4, 6, 5, generator=g) * 3  # TAESD-sized latents reach the decoder's tanh clamp
        assert_close_to_reference(
            vae.decode(wide).sample, ref.decode(wide).sample, atol=1e-5, what="decoded wide"
        )
        assert_close_to_reference(
            vae.scale_latents(z), ref.scale_latents(z), atol=1e-6, what="stored latents"
        )
        assert vae.encode(x, return_dict=False)[0].equal(z)
        stored = vae.scale_latents(z)
        assert stored.min() >= 0 and stored.max() <= 1
        inside = (stored > 0) & (stored < 1)
        torch.testing.assert_close(vae.unscale_latents(stored)[inside], z[inside], atol=1e-6, rtol=0)
        rounded = vae.unscale_latents(torch.round(vae.scale_latents(z) * 255) / 255)
        torch.testing.assert_close(vae(x).sample, vae.decode(rounded).sample, atol=1e-6, rtol=0)


def test_slicing_gives_the_same_batch(vae):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 5, 6, generator=g)
    with torch.no_grad():
        whole = vae.decode(z).sample
        vae.enable_slicing()
        try:
            sliced = vae.decode(z).sample
        finally:
            vae.disable_slicing()
    torch.testing.assert_close(sliced, whole, atol=1e-6, rtol=0)


def _paste_reference(x, run, tile, overlap, out_channels, scale):
    """The pasting formula written out per pixel: weight = ramp(r) * ramp(c), out = w * tile + (1 - w) * out."""
    blend = int(tile * overlap)
    stride = tile - blend
    h_in, w_in = x.shape[-2:]
    out = np.zeros((x.shape[0], out_channels, int(h_in * scale), int(w_in * scale)), dtype=np.float64)
    for i in range(0, h_in, stride):
        for j in range(0, w_in, stride):
            res = run(x[..., i : i + tile, j : j + tile]).double().numpy()
            for r in range(res.shape[-2]):
                for c in range(res.shape[-1]):
                    wr = 1.0 if i == 0 else min(r / (blend * scale - 1), 1.0)
                    wc = 1.0 if j == 0 else min(c / (blend * scale - 1), 1.0)
                    w = wr * wc
                    y, xx = int(i * scale) + r, int(j * scale) + c
                    out[..., y, xx] = w * res[..., r, c] + (1 - w) * out[..., y, xx]
    return out


@pytest.mark.parametrize("scale", [2, 0.5])
def test_tile_pasting_matches_the_written_out_formula(scale):
    """`_paste_tiles` equals the per-pixel formula (ramps, crop at the edges, paste order) to float32 rounding,
    for an upsampling run (decode-like) and a downsampling one (encode-like), on a size that leaves partial tiles."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, *((22, 19) if scale == 2 else (22, 30)), generator=g)
    tile = 8 if scale == 2 else 16

    def run(t):  # any deterministic local map with the right scale will do
        t = torch.tanh(t) * 1.5
        if scale == 2:
            return torch.nn.functional.interpolate(t, scale_factor=2, mode="nearest")
        return torch.nn.functional.avg_pool2d(t, 2)

    ours = _paste_tiles(x, run, tile, 0.25, 2, scale)
    expected = _paste_reference(x, run, tile, 0.25, 2, scale)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours.double().numpy(), expected, atol=1e-6, rtol=0)


def test_tiling_with_one_tile_is_the_plain_decode(vae):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 4, 6, 7, generator=g)
    with torch.no_grad():
        plain = vae.decode(z).sample
        vae.enable_tiling()
        vae.tile_latent_min_size = 8
        try:
            tiled = vae.decode(z).sample
        finally:
            vae.disable_tiling()
            vae.tile_latent_min_size = 64
    assert tiled.equal(plain)


def test_save_and_load_round_trip(vae, tmp_path):
    """save_pretrained writes an AutoencoderTiny config; from_pretrained (meta device, strict keys) restores it."""
    vae.save_pretrained(tmp_path / "vae")
    loaded = AutoencoderTiny.from_pretrained(tmp_path / "vae")
    assert loaded.config == vae.config
    for k, v in vae.state_dict().items():
        assert loaded.state_dict()[k].equal(v), k
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert loaded.decode(z).sample.equal(vae.decode(z).sample)
    half = AutoencoderTiny.from_pretrained(tmp_path / "vae", torch_dtype=torch.float16)
    assert half.dtype == torch.float16


def test_bad_input_rank_is_a_value_error(vae):
    with pytest.raises(ValueError, match=r"expects \(batch, channels, height, width\)"):
        vae.decode(torch.zeros(4, 8, 8))


def test_pipeline_takes_the_tiny_vae_as_its_vae(tmp_path):
    """`pipe.vae = AutoencoderTiny(...)` just works: 8 pixels per latent, the requested image size, and the image
    is exactly decode(denoised / scaling_factor) of the same run's latents, post-processed to [0, 1]."""
    from lcmkit import LatentConsistencyModelPipeline
    from lcmkit.tiny import build_tiny_lcm

    pipe = LatentConsistencyModelPipeline.from_pretrained(
        build_tiny_lcm(tmp_path / "lcm"), safety_checker=None
    )
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    pipe.vae = AutoencoderTiny(SMALL).eval()
    assert pipe.vae_scale_factor == 8
    kwargs = dict(prompt="a cat", height=64, width=48, num_inference_steps=2)
    image = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (48, 64)
    latents = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert latents.shape == (1, 4, 8, 6)
    pt = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="pt").images
    with torch.no_grad():
        expected = (pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(pt, expected, atol=1e-6, rtol=0)


def test_img2img_takes_the_tiny_vae(tmp_path):
    """img2img with the tiny VAE as its `vae` gives diffusers' LCM img2img image when diffusers' pipeline holds the
    same folder's weights and an AutoencoderTiny with the same weights (<= 1e-4)."""
    diffusers = pytest.importorskip("diffusers")
    from lcmkit import LatentConsistencyModelImg2ImgPipeline
    from lcmkit.tiny import build_tiny_lcm

    folder = build_tiny_lcm(tmp_path / "lcm")
    pipe = LatentConsistencyModelImg2ImgPipeline.from_pretrained(folder, safety_checker=None)
    ref = diffusers.LatentConsistencyModelImg2ImgPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False
    )
    torch.manual_seed(0)
    pipe.vae = AutoencoderTiny(SMALL).eval()
    ref.vae = diffusers_twin(pipe.vae)
    image = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    kwargs = dict(image=image, strength=0.5, num_inference_steps=2, output_type="pt")
    images = []
    for p in (pipe, ref):
        p.set_progress_bar_config(disable=True)
        images.append(p("a cat", generator=torch.Generator().manual_seed(2), **kwargs).images)
    assert images[0].shape == (1, 3, 64, 48)
    assert_close_to_reference(images[0], images[1], atol=1e-4, what="img2img image through the tiny VAE")
