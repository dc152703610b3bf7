"""`use_openvino_vae_decoder` / `OpenVINOVAEDecoder`: the AutoencoderKL decoder on OpenVINO, on a tiny random VAE.

What these tests prove:
- fp32: `vae.decode` with the stand-in equals our eager decode (max abs diff <= 1e-5) for a plain batch-2 decode,
  a sliced one (two batch-1 calls) and a tiled one whose small tiles give four tile shapes; each shape is compiled
  once (`compiled_shapes` names exactly the shapes those decodes ran), and the encoder side (`encode`, `dtype`,
  `device`) is untouched;
- int8-weights stays near eager (relative RMS error <= 0.05; measured 0.015 here: tiny random weights say the
  graph is the same function, not what image quality real weights keep);
- the graph upsamples as the reference does (nearest 2x, then the conv: Interpolate ops, no scatters), while the
  eager decoder keeps its sub-pixel upsamplers;
- int8 leaves the last up block and the output conv in float (no FakeQuantize before their convolutions) and
  quantizes the convolutions before them;
- the cache: a second stand-in on the same weights reads the graph from disk (converting again would raise, and no
  IR file is added), and int8-weights is quantized from the cached fp32 IR;
- what cannot work (another precision, a tiny VAE, a decoder already converted, a float16 VAE, wrong latents,
  saving the VAE without its decoder weights) raises a ValueError that says why.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lcmkit.models.vae import AutoencoderKL
from lcmkit.tiny import TINY_VAE

pytest.importorskip("openvino", reason="the OpenVINO fast mode is an optional extra (lcmkit[openvino])")

from lcmkit.accel import (  # noqa: E402
    OpenVINOVAEDecoder,
    graphs,  # noqa: E402
    use_openvino_vae_decoder,
)
from lcmkit.accel.vae_decoder import decoder_source as graphs_source  # noqa: E402

FP32_TOL = 1e-5
INT8_WEIGHTS_REL_RMS = 0.05
# 4 latent channels, vae_scale_factor 2, a mid-block attention: every kind of layer the SD decoder has
CONFIG = TINY_VAE
TILE_LATENT, TILE_SAMPLE = 8, 16  # tile stride 6 latents: 12x20 latents make a 2x4 grid of 4 distinct shapes


def _decode(
    vae: AutoencoderKL, z: torch.Tensor, *, slicing: bool = False, tiling: bool = False
) -> torch.Tensor:
    vae.use_slicing, vae.use_tiling = slicing, tiling
    vae.tile_latent_min_size, vae.tile_sample_min_size = TILE_LATENT, TILE_SAMPLE
    try:
        with torch.no_grad():
            return vae.decode(z).sample
    finally:
        vae.use_slicing = vae.use_tiling = False


def _tile_shapes(z: torch.Tensor) -> set[tuple[int, int, int, int]]:
    """The latent tile shapes `_tiled_decode` cuts `z` into (same grid arithmetic as AutoencoderKL._tiled)."""
    stride = int(TILE_LATENT * 0.75)
    b, c, h, w = z.shape
    return {
        (b, c, len(range(i, min(i + TILE_LATENT, h))), len(range(j, min(j + TILE_LATENT, w))))
        for i in range(0, h, stride)
        for j in range(0, w, stride)
    }


@pytest.fixture(scope="module")
def eager() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(CONFIG).eval()


@pytest.fixture(scope="module")
def z() -> torch.Tensor:
    return torch.randn(2, 4, 12, 20, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ov_cache")


@pytest.fixture(scope="module")
def fast(eager, cache) -> AutoencoderKL:
    """A copy of `eager` whose decoder runs on OpenVINO fp32 (converted once for the whole module)."""
    vae = copy.deepcopy(eager)
    use_openvino_vae_decoder(vae, "fp32", cache_dir=cache, threads=1)
    return vae


def _graphs(folder) -> set[str]:
    return {p.name for p in folder.iterdir() if p.suffix in (".xml", ".bin")}


def test_fp32_plain_sliced_and_tiled_decode_match_eager(eager, fast, z):
    decoder = fast.decoder
    assert isinstance(decoder, OpenVINOVAEDecoder)
    assert (_decode(fast, z) - _decode(eager, z)).abs().max() <= FP32_TOL
    assert decoder.compiled_shapes == [(2, 4, 12, 20)]
    assert (_decode(fast, z, slicing=True) - _decode(eager, z, slicing=True)).abs().max() <= FP32_TOL
    assert decoder.compiled_shapes == [(1, 4, 12, 20), (2, 4, 12, 20)]
    tiles = _tile_shapes(z)
    assert len(tiles) == 4  # the tiling really splits, into tiles of four shapes
    tiled = _decode(fast, z, tiling=True)
    assert tiled.shape == (2, 3, 24, 40)
    assert (tiled - _decode(eager, z, tiling=True)).abs().max() <= FP32_TOL
    assert set(decoder.compiled_shapes) == {(1, 4, 12, 20), (2, 4, 12, 20)} | tiles
    _decode(fast, z)  # a shape seen before: no new compilation
    assert len(decoder.compiled_shapes) == 6


def test_encoder_side_stays_eager(eager, fast):
    """`encode`, `dtype` and `device` still come from the eager encoder; the decoder's weights are gone."""
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(fast.encode(x).latent_dist.mean, eager.encode(x).latent_dist.mean)
    assert fast.dtype == torch.float32 and fast.device == torch.device("cpu")
    assert not list(fast.decoder.parameters())
    with pytest.raises(ValueError, match="cannot be saved"):
        fast.state_dict()


def test_cache_is_read_back(eager, fast, cache, z, monkeypatch):
    """A second stand-in on the same weights converts nothing and writes no new IR."""
    before = _graphs(cache)
    # .xml and .bin of the free-shape graph (each decoded shape's static graph is saved beside it, one dash more)
    assert len([n for n in before if n.startswith("vae-decoder-fp32-") and n.count("-") == 3]) == 2
    monkeypatch.setattr(graphs, "convert", _no_conversion)
    again = copy.deepcopy(eager)
    use_openvino_vae_decoder(again, "fp32", cache_dir=cache, threads=1)
    assert (_decode(again, z) - _decode(eager, z)).abs().max() <= FP32_TOL
    assert _graphs(cache) == before


def test_graph_upsamples_as_the_reference_does(eager, fast, cache):
    """Eager decoding runs sub-pixel upsamplers; traced, their phase interleave became scatters OpenVINO runs
    slowly, so a graph gets the plain form, and the switches are left as they are."""
    import openvino as ov

    upsamplers = [m for m in eager.decoder.modules() if type(m).__name__ == "Upsample2D"]
    assert upsamplers and all(m.subpixel is True for m in upsamplers)
    (xml,) = [p for p in cache.iterdir() if p.name.startswith("vae-decoder-fp32-") and p.name.count("-") == 3
              and p.suffix == ".xml"]  # fmt: skip
    ops = [op.get_type_name() for op in ov.Core().read_model(xml).get_ordered_ops()]
    assert ops.count("Interpolate") == len(upsamplers)
    assert "ScatterNDUpdate" not in ops and "ScatterUpdate" not in ops
    z = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        traced = torch.jit.trace(graphs_source(eager).traced, z, check_trace=False)
        assert (traced(z) - eager.decoder(z)).abs().max() <= FP32_TOL
    assert all(m.subpixel is True for m in upsamplers)


def test_int8_keeps_the_last_block_in_float(eager):
    pytest.importorskip("nncf")
    import numpy as np
    import openvino as ov

    source = graphs_source(copy.deepcopy(eager))
    rng = np.random.default_rng(0)
    calibration = [[rng.standard_normal((1, 4, 8, 8)).astype(np.float32)] for _ in range(2)]
    model = graphs.load_or_build(ov, source, "int8", calibration, None)
    last = f".up_blocks.{len(eager.decoder.up_blocks) - 1}."
    quantized = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Convolution":
            producer = op.input(0).get_source_output().get_node().get_type_name()
            quantized[op.get_friendly_name()] = producer == "FakeQuantize"
    kept = {name: q for name, q in quantized.items() if last in name or ".conv_out/" in name}
    assert kept and not any(kept.values()), kept
    assert any(q for name, q in quantized.items() if name not in kept), quantized


def _no_conversion(*args, **kwargs):
    raise AssertionError("converted again instead of reading the cache")


def test_int8_weights_stays_near_eager(eager, fast, cache, z, monkeypatch):
    """Quantized from the fp32 IR the `fast` fixture cached: no second trace."""
    pytest.importorskip("nncf")
    monkeypatch.setattr(graphs, "convert", _no_conversion)
    vae = copy.deepcopy(eager)
    use_openvino_vae_decoder(vae, "int8-weights", cache_dir=cache, threads=1)
    ref = _decode(eager, z)
    rel = float((_decode(vae, z) - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
    print(f"int8-weights: relative RMS error {rel:.4f}")
    assert rel <= INT8_WEIGHTS_REL_RMS, f"int8-weights: relative RMS error {rel:.4f}"
    assert any(name.startswith("vae-decoder-int8-weights-") for name in _graphs(cache))


def test_refusals_say_why(eager, fast, tmp_path):
    from lcmkit.models.tiny_vae import AutoencoderTiny, TinyVAEConfig

    for precision in ("int8", "int8-hybrid", "int4"):
        with pytest.raises(ValueError, match=r"allowed: \['fp32', 'fp16-weights', 'int8-weights'\]"):
            use_openvino_vae_decoder(copy.deepcopy(eager), precision, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="AutoencoderTiny"):
        use_openvino_vae_decoder(AutoencoderTiny(TinyVAEConfig()), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="already an OpenVINO one"):
        use_openvino_vae_decoder(fast, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="float32 on the CPU"):
        use_openvino_vae_decoder(copy.deepcopy(eager).to(torch.float16), cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"latents \(batch, 4, height, width\)"):
        fast.decoder(torch.zeros(1, 3, 8, 8))
    assert not list(tmp_path.iterdir())  # refused before any conversion work
