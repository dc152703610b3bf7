"""`lcmkit.runtime.FastPaths`: one options object for every exact-mode fast path.

What these tests prove: the presets are what they say (`reference()` turns every path off, `default()` is what a
model gets when built); combinations where one path would silently switch another off raise naming both; one
`set_fast_paths` reaches every layer of the UNet and the VAE and the pipeline's paging; under `reference()` no fast
variant runs at all, and the image stays within the parity tolerance (1e-4) of the default one; the older switches
are aliases that build a new FastPaths.
"""

from __future__ import annotations

from dataclasses import fields, replace

import pytest
import torch

from lcmkit import LatentConsistencyModelPipeline, cli
from lcmkit.nn import fast
from lcmkit.nn.conv import Conv2d
from lcmkit.nn.resnet import ResnetBlock2D
from lcmkit.nn.sampling import Upsample2D
from lcmkit.nn.transformer import SpatialTransformer
from lcmkit.runtime import FastPaths

TOL = 1e-4


@pytest.fixture(scope="module")
def pipe():
    pipe = LatentConsistencyModelPipeline.from_pretrained(cli.DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe) -> torch.Tensor:
    out = pipe(
        "a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt"
    )
    return out.images


def test_presets():
    assert FastPaths.default() == FastPaths()
    ref = FastPaths.reference()
    assert ref.backend == "torch"
    assert ref.vae_memory_format == "contiguous"
    assert ref.choose == "thresholds" and FastPaths.default().choose == "probe"  # the reference times nothing
    for f in fields(FastPaths):
        value = getattr(ref, f.name)
        if f.name not in ("backend", "vae_memory_format", "choose"):
            assert value in ("off", False), f"reference() leaves {f.name}={value!r} on"
    with pytest.raises(AttributeError):
        ref.conv_prepack = "auto"  # frozen


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        (dict(vae_memory_format="channels_last"), ("vae_memory_format", "conv_winograd")),
        (
            dict(vae_memory_format="channels_last", conv_winograd="always"),
            ("vae_memory_format", "conv_winograd"),
        ),
        (dict(conv_prepack="off"), ("residual_into_conv", "conv_prepack")),
    ],
)
def test_combinations_that_would_drop_a_path_raise_naming_both(changes, names):
    with pytest.raises(ValueError) as error:
        FastPaths(**changes)
    assert all(name in str(error.value) for name in names)


def test_valid_neighbours_of_those_combinations():
    FastPaths(vae_memory_format="channels_last", conv_winograd="off")
    FastPaths(conv_prepack="off", residual_into_conv=False)


@pytest.mark.parametrize(
    "changes",
    [
        dict(conv_prepack="fast"),
        dict(unet_subpixel=True),
        dict(weight_paging="yes"),
        dict(backend="onnx"),
        dict(choose="measure"),
    ],
)
def test_unknown_values_raise_naming_the_field(changes):
    (name,) = changes
    with pytest.raises(ValueError, match=f"FastPaths.{name}="):
        FastPaths(**changes)


def test_one_call_reaches_every_layer_and_the_paging(pipe):
    try:
        pipe.set_fast_paths(FastPaths.reference())
        assert pipe.fast_paths == FastPaths.reference() and not pipe.weight_paging
        for model in (pipe.unet, pipe.vae):
            assert model.fast_paths == FastPaths.reference()
            layers = list(model.modules())
            assert any(isinstance(m, Conv2d) for m in layers)
            for m in layers:
                if isinstance(m, Conv2d):
                    assert (m.prepack, m.winograd) == ("off", "off")
                elif isinstance(m, ResnetBlock2D):
                    assert not (m.inplace_activations or m.residual_into_conv)
                elif isinstance(m, SpatialTransformer):
                    assert not m.fused_projections
                elif isinstance(m, Upsample2D):
                    assert m.subpixel is False
        assert pipe.vae.decoder.memory_format == pipe.vae.encoder.memory_format == "contiguous"
    finally:
        pipe.set_fast_paths(FastPaths.default())
    assert pipe.vae.decoder.memory_format == "auto" and pipe.weight_paging
    with pytest.raises(TypeError, match="FastPaths"):
        pipe.set_fast_paths({"conv_prepack": "off"})


def test_reference_runs_no_fast_variant_and_stays_close_to_the_default(pipe, monkeypatch):
    default = _image(pipe)
    calls = []
    for name in ("resnet_block", "spatial_transformer", "upsample_subpixel", "conv2d_add_into"):
        real = getattr(fast, name)
        monkeypatch.setattr(fast, name, lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))
    for module in ("lcmkit.nn.resnet", "lcmkit.nn.transformer", "lcmkit.nn.sampling"):  # their imported names
        for name in ("resnet_block", "spatial_transformer", "upsample_subpixel"):
            if hasattr(__import__(module, fromlist=[name]), name):
                monkeypatch.setattr(f"{module}.{name}", getattr(fast, name))
    _image(pipe)
    assert {"resnet_block", "spatial_transformer", "upsample_subpixel"} <= set(calls)  # the spies see them
    calls.clear()
    try:
        pipe.set_fast_paths(FastPaths.reference())
        reference = _image(pipe)
    finally:
        pipe.set_fast_paths(FastPaths.default())
    assert calls == []
    torch.testing.assert_close(reference, default, atol=TOL, rtol=0)


def test_from_pretrained_takes_fast_paths(pipe):
    loaded = LatentConsistencyModelPipeline.from_pretrained(
        cli.DEFAULT_MODEL, fast_paths=FastPaths.reference()
    )
    loaded.set_progress_bar_config(disable=True)
    assert loaded.fast_paths == loaded.unet.fast_paths == loaded.vae.fast_paths == FastPaths.reference()
    try:
        pipe.set_fast_paths(FastPaths.reference())
        assert torch.equal(_image(loaded), _image(pipe))
    finally:
        pipe.set_fast_paths(FastPaths.default())


def test_the_older_switches_build_a_new_fast_paths(pipe):
    try:
        pipe.set_conv_prepacking("off")
        assert (pipe.fast_paths.conv_prepack, pipe.fast_paths.residual_into_conv) == ("off", False)
        pipe.set_conv_prepacking("always")
        assert (pipe.fast_paths.conv_prepack, pipe.fast_paths.residual_into_conv) == ("always", True)
        pipe.set_conv_winograd("off")
        assert pipe.unet.fast_paths.conv_winograd == "off"
        pipe.disable_weight_paging()
        assert not pipe.fast_paths.weight_paging
        pipe.unet.disable_subpixel_upsampling()
        pipe.vae.disable_subpixel_upsampling()
        assert (pipe.unet.fast_paths.unet_subpixel, pipe.vae.fast_paths.vae_subpixel) == ("off", "off")
        pipe.vae.set_memory_format("channels_last")  # allowed: Winograd is off
        assert pipe.vae.fast_paths == replace(
            pipe.fast_paths, vae_memory_format="channels_last", unet_subpixel="auto", vae_subpixel="off"
        )
        with pytest.raises(ValueError, match="not one of"):
            pipe.set_conv_winograd("fast")
    finally:
        pipe.set_fast_paths(FastPaths.default())
        pipe.unet.set_fast_paths(FastPaths.default())
        pipe.vae.set_fast_paths(FastPaths.default())


@pytest.mark.parametrize("channels", [(32, 32), (32, 64)])
def test_the_bitwise_resnet_paths_are_bitwise(channels):
    """`inplace_activations` and `residual_into_conv` claim the reference's bits: a block with both off (the
    reference forward) and with each on gives the same tensor, on a map large enough for the fused convolution."""
    torch.manual_seed(0)
    block = ResnetBlock2D(*channels, temb_channels=None, groups=8).eval()
    block.sum_into_input = True
    x = torch.randn(1, channels[0], 40, 40)
    outputs = []
    with torch.no_grad():
        for inplace, residual in ((False, False), (True, False), (False, True), (True, True)):
            block.inplace_activations, block.residual_into_conv = inplace, residual
            outputs.append(block(x.clone()))
    assert all(torch.equal(out, outputs[0]) for out in outputs[1:])
