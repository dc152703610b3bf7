"""`lcmkit.nn.Conv2d`: oneDNN-packed weights give `F.conv2d`'s result, and are remade whenever the weight changes."""

from __future__ import annotations

import copy
import pickle
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lcmkit import LatentConsistencyModelPipeline
from lcmkit.nn import ResnetBlock2D
from lcmkit.nn.conv import (
    PACKED_MAX_PIXELS,
    WINOGRAD_MIN_CHANNELS,
    WINOGRAD_MIN_PIXELS,
    Conv2d,
    set_conv_prepacking,
    set_conv_winograd,
    winograd_available,
)

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="packing needs oneDNN (mkldnn)"
)


def reference(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def make(prepack: str = "always", stride: int = 1, seed: int = 0) -> Conv2d:
    torch.manual_seed(seed)
    return Conv2d(32, 48, 3, stride=stride, padding=1, prepack=prepack).eval()


def packed(conv: Conv2d) -> bool:
    return conv._packed.value is not None


@pytest.mark.parametrize("stride", [1, 2])
def test_packed_forward_matches_conv2d(stride):
    conv = make(stride=stride)
    x = torch.randn(2, 32, 16, 12)
    with torch.no_grad():
        y = conv(x)
    assert packed(conv)
    torch.testing.assert_close(y, reference(conv, x), atol=1e-5, rtol=1e-5)


def test_auto_packs_memory_mapped_weights_and_releases_their_pages(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("file-backed pages are detected through /proc/self/pagemap")
    from lcmkit.loading.paging import resident_weight_bytes

    torch.manual_seed(0)
    conv = Conv2d(256, 256, 3, padding=1).eval()  # 2.4 MB: well above the kernel's 64 KB fault-around
    x = torch.randn(1, 256, 16, 16)
    save_file({k: v.contiguous() for k, v in conv.state_dict().items()}, tmp_path / "conv.safetensors")
    conv.load_state_dict(load_file(tmp_path / "conv.safetensors"), assign=True)  # mmapped, as from_pretrained
    with torch.no_grad():
        y = conv(x)
    assert packed(conv)
    assert resident_weight_bytes(conv) < conv.weight.numel() * 4 // 2  # the plain copy's pages went back
    torch.testing.assert_close(y, reference(conv, x), atol=1e-5, rtol=1e-5)


def test_auto_keeps_in_memory_weights_on_the_plain_path():
    conv = make("auto")
    x = torch.randn(1, 32, 16, 16)
    with torch.no_grad():
        y = conv(x)
        assert not packed(conv)  # a packed copy would cost memory here
        assert torch.equal(y, reference(conv, x))


def test_off_large_inputs_and_autograd_use_the_plain_path():
    conv = make("off")
    with torch.no_grad():
        conv(torch.randn(1, 32, 8, 8))
    assert not packed(conv)

    conv = make("always")
    side = int(PACKED_MAX_PIXELS**0.5) * 2
    with torch.no_grad():
        conv(torch.randn(1, 32, side, side))
    assert not packed(conv)

    conv = make("always").train()
    x = torch.randn(1, 32, 8, 8, requires_grad=True)
    conv(x).sum().backward()
    assert not packed(conv)
    assert conv.weight.grad is not None and x.grad is not None


def test_changed_replaced_and_cast_weights_are_repacked():
    conv = make()
    x = torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        conv(x)
        conv.weight.mul_(-2.0)  # in place: the version counter moves
        torch.testing.assert_close(conv(x), reference(conv, x), atol=1e-5, rtol=1e-5)
        conv.weight = torch.nn.Parameter(torch.randn_like(conv.weight))  # replaced
        torch.testing.assert_close(conv(x), reference(conv, x), atol=1e-5, rtol=1e-5)
        conv.load_state_dict(make(seed=1).state_dict())  # copied in
        torch.testing.assert_close(conv(x), reference(conv, x), atol=1e-5, rtol=1e-5)
        conv.double()  # float64: never packed
        xd = x.double()
        torch.testing.assert_close(conv(xd), reference(conv, xd))
        conv.float()
        torch.testing.assert_close(conv(x), reference(conv, x), atol=1e-5, rtol=1e-5)


def test_copies_and_pickles_drop_the_packed_weight():
    conv = make()
    x = torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        conv(x)
        for clone in (copy.deepcopy(conv), pickle.loads(pickle.dumps(conv))):
            assert not packed(clone)
            clone.weight.add_(1.0)
            torch.testing.assert_close(clone(x), reference(clone, x), atol=1e-5, rtol=1e-5)
    assert set(conv.state_dict()) == {"weight", "bias"}


def test_set_conv_prepacking_reaches_every_layer_and_rejects_unknown_modes():
    model = torch.nn.Sequential(make("auto"), torch.nn.SiLU(), make("auto"))
    assert set_conv_prepacking(model, "off") == 2
    assert all(layer.prepack == "off" for layer in model if isinstance(layer, Conv2d))
    with pytest.raises(ValueError, match="'fast' is not one of"):
        set_conv_prepacking(model, "fast")


def test_packed_convs_give_the_plain_image(tiny_folders):
    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny_folders["sd15"])
    pipe.set_progress_bar_config(disable=True)
    pipe.disable_weight_paging()
    kw = dict(num_inference_steps=2, output_type="np")
    packed = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    layers = [m for m in pipe.unet.modules() if isinstance(m, Conv2d)]
    assert any(m._packed.value is not None for m in layers)  # "auto": the folder's weights are memory-mapped
    pipe.set_conv_prepacking("off")
    plain = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    np.testing.assert_allclose(packed, plain, atol=1e-5)


def test_an_unfused_lora_keeps_the_packed_base_and_adds_its_own_path():
    from lcmkit.nn.lora import LoraLayer, LoraWeights

    conv = make()
    layer = LoraLayer(conv)
    g = torch.Generator().manual_seed(0)
    lora = LoraWeights(
        down=torch.randn(2, 32, 3, 3, generator=g), up=torch.randn(48, 2, 1, 1, generator=g), alpha=2.0
    )
    layer.add_adapter("a", lora)
    layer.active = ["a"]
    x = torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        y = layer(x)
        expected = reference(conv, x) + F.conv2d(F.conv2d(x, lora.down, padding=1), lora.up)
    assert packed(conv)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-5)


def test_weights_made_under_inference_mode_take_the_plain_path():
    """Inference tensors have no version counter, so an in-place edit could not be noticed: never packed."""
    with torch.inference_mode():
        conv = make()
        x = torch.randn(1, 32, 8, 8)
        y = conv(x)
        assert not packed(conv)
        assert torch.equal(y, reference(conv, x))


@pytest.mark.parametrize("channels_last", [False, True])
def test_add_into_adds_the_convolution_into_other(channels_last):
    torch.manual_seed(0)
    conv = Conv2d(16, 24, 3, padding=1).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 16, 66, 70).contiguous(memory_format=fmt)
    other = torch.randn(2, 24, 66, 70).contiguous(memory_format=fmt)
    with torch.no_grad():
        expected = other + F.conv2d(x, conv.weight, conv.bias, padding=1)
        got = conv.add_into(x, other)
    assert got is not None and got.data_ptr() == other.data_ptr()
    torch.testing.assert_close(other, expected, atol=1e-5, rtol=0)


def test_add_into_declines_where_it_does_not_apply():
    """None, and `other` untouched: small maps, float64, mixed layouts, a view, a size-changing conv, or autograd
    on."""
    torch.manual_seed(0)
    conv = Conv2d(16, 16, 3, padding=1).eval()
    big = torch.randn(1, 16, 40, 40)
    cases = [
        (torch.randn(1, 16, 32, 32), torch.randn(1, 16, 32, 32)),  # <= PACKED_MAX_PIXELS
        (big, big.contiguous(memory_format=torch.channels_last).clone()),  # layouts differ
        (big, torch.randn(1, 16, 40, 80)[..., :40]),  # other is a (strided) view
    ]
    strided = Conv2d(16, 16, 3, padding=1, stride=2).eval()
    with torch.no_grad():
        assert strided.add_into(big, torch.randn(1, 16, 20, 20)) is None  # only same-size convolutions
    with torch.no_grad():
        for x, other in cases:
            before = other.clone()
            assert conv.add_into(x, other) is None
            assert torch.equal(other, before)
        conv64 = Conv2d(16, 16, 3, padding=1).double().eval()
        assert conv64.add_into(big.double(), big.double().clone()) is None
    assert conv.add_into(big, big.clone()) is None  # autograd on: the weight requires grad
    conv.prepack = "off"  # plain F.conv2d only
    with torch.no_grad():
        assert conv.add_into(big, big.clone()) is None


# -- Winograd path (NNPACK) ------------------------------------------------------------------------------------------

needs_winograd = pytest.mark.skipif(not winograd_available(), reason="NNPACK is not usable on this CPU/build")


@pytest.fixture
def nnpack_calls(monkeypatch):
    """Count calls of the NNPACK convolution (and still run it)."""
    calls = []
    real = torch._nnpack_spatial_convolution

    def spy(x, *args):
        calls.append(tuple(x.shape))
        return real(x, *args)

    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", spy)
    return calls


def _relative_error(got: torch.Tensor, conv: torch.nn.Conv2d, x: torch.Tensor) -> float:
    exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    return ((got.double() - exact).abs().max() / exact.abs().max()).item()


@needs_winograd
@pytest.mark.parametrize("batch", [1, 3])
def test_winograd_matches_the_convolution(nnpack_calls, batch):
    """One NNPACK call per sample; within float rounding of a float64 convolution (Winograd rounds more than a
    direct convolution: ~1e-5 of the output's scale at SD sizes)."""
    torch.manual_seed(0)
    conv = Conv2d(24, 40, 3, padding=1, winograd="always").eval()
    x = torch.randn(batch, 24, 21, 30)
    with torch.no_grad():
        y = conv(x)
    assert nnpack_calls == [(1, 24, 21, 30)] * batch
    assert y.shape == (batch, 40, 21, 30) and y.is_contiguous()
    assert _relative_error(y, conv, x) < 2e-5
    for i in range(batch):  # each sample is its own call's result, in its own place
        with torch.no_grad():
            torch.testing.assert_close(y[i : i + 1], conv(x[i : i + 1]), atol=0, rtol=0)


@needs_winograd
def test_winograd_auto_takes_large_maps_with_many_channels(nnpack_calls):
    torch.manual_seed(0)
    conv = Conv2d(WINOGRAD_MIN_CHANNELS, WINOGRAD_MIN_CHANNELS, 3, padding=1).eval()
    side = int(WINOGRAD_MIN_PIXELS**0.5)
    big = torch.randn(1, WINOGRAD_MIN_CHANNELS, side, side)
    small = torch.randn(1, WINOGRAD_MIN_CHANNELS, side, side - 1)
    assert conv.winograd == "auto"
    assert conv.takes_winograd(big.shape, big.dtype, big.device)
    assert not conv.takes_winograd(small.shape, small.dtype, small.device)
    with torch.no_grad():
        y = conv(big)
        conv(small)
        assert conv.add_into(big, torch.randn_like(y)) is None  # the Winograd conv beats the fused direct one
    assert nnpack_calls == [tuple(big.shape)]
    assert _relative_error(y, conv, big) < 2e-5
    few = Conv2d(WINOGRAD_MIN_CHANNELS, WINOGRAD_MIN_CHANNELS - 1, 3, padding=1)
    assert not few.takes_winograd(big.shape, big.dtype, big.device)


@needs_winograd
def test_winograd_declines_where_it_does_not_apply(nnpack_calls):
    """Plain path (and exactly F.conv2d's result) for: "off", channels-last or strided input, other strides,
    paddings, dilations, groups or kernel sizes, float64, autograd, and NNPACK turned off in torch.backends."""
    torch.manual_seed(0)
    x = torch.randn(1, 16, 12, 12)
    layers = [
        Conv2d(16, 16, 3, padding=1, winograd="off"),
        Conv2d(16, 16, 3, padding=1, stride=2, winograd="always"),
        Conv2d(16, 16, 3, padding=0, winograd="always"),
        Conv2d(16, 16, 3, padding=2, dilation=2, winograd="always"),
        Conv2d(16, 16, 3, padding=1, groups=2, winograd="always"),
        Conv2d(16, 16, 1, winograd="always"),
        Conv2d(16, 16, 3, padding=1, padding_mode="reflect", winograd="always"),
    ]
    conv = Conv2d(16, 16, 3, padding=1, winograd="always").eval()
    with torch.no_grad():
        for layer in layers:
            assert torch.equal(layer(x), torch.nn.Conv2d.forward(layer, x))
        nhwc = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(conv(nhwc), reference(conv, nhwc))
        wide = torch.randn(1, 16, 12, 24)[..., ::2]  # a strided view
        assert torch.equal(conv(wide), reference(conv, wide))
        conv64 = Conv2d(16, 16, 3, padding=1, winograd="always").double().eval()
        assert torch.equal(conv64(x.double()), reference(conv64, x.double()))
        with torch.backends.nnpack.flags(enabled=False):
            assert not conv.takes_winograd(x.shape, x.dtype, x.device)
            assert torch.equal(conv(x), reference(conv, x))
    y = conv(x)  # autograd on: the weight requires grad
    assert y.requires_grad
    with torch.no_grad():
        traced = torch.jit.trace(conv, x, check_trace=False)  # graphs get the plain convolution
        assert torch.equal(traced(x), reference(conv, x))
    assert nnpack_calls == []


def test_set_conv_winograd_reaches_every_layer_and_rejects_unknown_modes():
    model = torch.nn.Sequential(make(), torch.nn.SiLU(), make())
    assert set_conv_winograd(model, "off") == 2
    assert all(layer.winograd == "off" for layer in model if isinstance(layer, Conv2d))
    with pytest.raises(ValueError, match="'fast' is not one of"):
        set_conv_winograd(model, "fast")


@needs_winograd
def test_pipeline_winograd_switch(tiny_folders, nnpack_calls):
    """`pipe.set_conv_winograd("always")` reaches the UNet and the VAE; the image stays within the pipelines'
    1e-4 of the direct convolutions'."""
    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny_folders["sd15"])
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, output_type="np")
    pipe.set_conv_winograd("off")
    direct = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert nnpack_calls == []
    pipe.set_conv_winograd("always")
    winograd = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    unet_resnets = sum(isinstance(m, ResnetBlock2D) for m in pipe.unet.modules())
    assert len(nnpack_calls) >= 2 * 2 * unet_resnets  # two UNet calls, at least both resnet convs in each
    np.testing.assert_allclose(winograd, direct, atol=1e-4)
    with pytest.raises(ValueError, match="not one of"):
        pipe.set_conv_winograd("fast")
