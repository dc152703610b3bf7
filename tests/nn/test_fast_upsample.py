"""The sub-pixel form of "nearest 2x upsample, then 3x3 conv" equals the plain path.

Reference: `F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), W, b, padding=1)`, which is what
`Upsample2D` (and diffusers' `Upsample2D`) computes. Tolerance 1e-5 absolute in float32 with conv-initialised
weights (outputs of order 1), on odd and even sizes down to 1x1, with and without bias; the kernels are also
checked tap by tap against the merge rule, so a wrong phase order or offset cannot hide behind a tolerance.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lcmkit.nn.fast_upsample import nearest2x_conv3x3, subpixel_kernels


def _plain(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), conv.weight, conv.bias, padding=1)


@pytest.mark.parametrize(
    "batch, c_in, c_out, h, w",
    [(1, 3, 5, 1, 1), (2, 4, 4, 5, 7), (1, 8, 6, 8, 8), (3, 16, 12, 9, 4), (1, 32, 32, 13, 11)],
)
@pytest.mark.parametrize("bias", [True, False])
def test_equals_nearest_upsample_then_conv(batch, c_in, c_out, h, w, bias):
    g = torch.Generator().manual_seed(h * 31 + w)
    torch.manual_seed(c_in + c_out)
    conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias)
    x = torch.randn(batch, c_in, h, w, generator=g)
    with torch.no_grad():
        expected = _plain(x, conv)
        actual = nearest2x_conv3x3(x, conv.weight, conv.bias)
    assert actual.shape == (batch, c_out, 2 * h, 2 * w)
    assert expected.abs().max() > 0.1  # the comparison is not between near-zero tensors
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch, c_in, c_out, h, w", [(1, 8, 6, 5, 7), (2, 16, 12, 8, 8), (1, 3, 5, 1, 1)])
def test_channels_last_input_stays_channels_last(batch, c_in, c_out, h, w):
    """A channels-last input gives a channels-last output with the same values (the NHWC interleave)."""
    torch.manual_seed(c_in * h)
    conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1)
    x = torch.randn(batch, c_in, h, w).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        actual = nearest2x_conv3x3(x, conv.weight, conv.bias)
        expected = _plain(x.contiguous(), conv)
    assert actual.shape == (batch, c_out, 2 * h, 2 * w)
    if h * w > 1:
        assert actual.is_contiguous(memory_format=torch.channels_last) and not actual.is_contiguous()
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_precomputed_kernels_and_non_contiguous_input():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 4, 3, padding=1)
    x = torch.randn(2, 9, 6, 6)[:, 1:7].transpose(2, 3)  # channel slice and transposed: not contiguous
    with torch.no_grad():
        kernels = subpixel_kernels(conv.weight)
        torch.testing.assert_close(
            nearest2x_conv3x3(x, conv.weight, conv.bias, kernels=kernels), _plain(x, conv), atol=1e-5, rtol=0
        )


def test_kernels_follow_the_merge_rule():
    """K_ab[p, q] = sum of W[k, l] over the taps k (l) that land on input row p (column q) for phase a (b)."""
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    k = subpixel_kernels(w).view(2, 2, 3, 2, 2, 2)
    rows = {0: ([0], [1, 2]), 1: ([0, 1], [2])}
    for a in (0, 1):
        for b in (0, 1):
            for p in (0, 1):
                for q in (0, 1):
                    expected = w[:, :, rows[a][p]][:, :, :, rows[b][q]].sum(dim=(2, 3))
                    torch.testing.assert_close(k[a, b, :, :, p, q], expected, atol=1e-12, rtol=0)


def test_half_precision_kernels_are_rounded_once():
    w = torch.randn(4, 4, 3, 3)
    half = subpixel_kernels(w.half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half, subpixel_kernels(w.half().float()).half(), atol=0, rtol=0)


def test_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="3x3 conv weights"):
        subpixel_kernels(torch.zeros(4, 4, 5, 5))
    with pytest.raises(ValueError, match=r"\(batch, channels, height, width\)"):
        nearest2x_conv3x3(torch.zeros(4, 8, 8), torch.zeros(4, 4, 3, 3))
    with pytest.raises(ValueError, match="do not fit"):
        nearest2x_conv3x3(torch.zeros(1, 4, 8, 8), torch.zeros(4, 4, 3, 3), kernels=torch.zeros(16, 3, 2, 2))


def test_upsample_layer_made_under_inference_mode():
    """Weights made under inference_mode have no version counter: the layer computes its kernels fresh."""
    from lcmkit.nn.sampling import Upsample2D

    with torch.inference_mode():
        layer = Upsample2D(8, subpixel=True)
        x = torch.randn(1, 8, 4, 4)
        expected = F.conv2d(
            F.interpolate(x, scale_factor=2.0, mode="nearest"), layer.conv.weight, layer.conv.bias, padding=1
        )
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_upsample_auto_takes_the_subpixel_form_on_large_inputs_only(monkeypatch):
    """subpixel="auto": sub-pixel form from SUBPIXEL_MIN_PIXELS input pixels on (same values up to rounding), the
    reference form below that, for other output sizes and while a graph is traced."""
    from lcmkit.nn import fast
    from lcmkit.nn.sampling import SUBPIXEL_MIN_PIXELS, Upsample2D

    calls = []
    real = fast.nearest2x_conv3x3
    monkeypatch.setattr(
        fast, "nearest2x_conv3x3", lambda x, *a, **k: calls.append(x.shape) or real(x, *a, **k)
    )
    torch.manual_seed(0)
    layer = Upsample2D(8, subpixel="auto").eval()
    side = int(SUBPIXEL_MIN_PIXELS**0.5)
    big, small = torch.randn(1, 8, side, side), torch.randn(1, 8, side - 1, side)

    def reference(x: torch.Tensor, size=None) -> torch.Tensor:
        up = (
            F.interpolate(x, scale_factor=2.0, mode="nearest")
            if size is None
            else F.interpolate(x, size=size)
        )
        return F.conv2d(up, layer.conv.weight, layer.conv.bias, padding=1)

    with torch.no_grad():
        torch.testing.assert_close(layer(big), reference(big), atol=1e-5, rtol=1e-5)
        assert calls == [big.shape]
        assert torch.equal(layer(small), reference(small))
        assert torch.equal(layer(big, (2 * side + 1, 2 * side)), reference(big, (2 * side + 1, 2 * side)))
        traced = torch.jit.trace(layer, big, check_trace=False)
        assert torch.equal(traced(big), reference(big))
        layer.subpixel = True  # "always" too: a traced graph gets the reference form in every mode
        traced = torch.jit.trace(layer, big, check_trace=False)
        assert torch.equal(traced(big), reference(big))
    assert calls == [big.shape]


@pytest.mark.parametrize("subpixel, side", [(True, 4), ("auto", 32)])
def test_upsample_with_a_lora_adapter_on_its_conv_adds_the_adapter(subpixel, side):
    """A LoRA-wrapped upsampler conv (kohya and LCM-LoRA files target `upsamplers.0.conv`): the sub-pixel form adds
    each unfused adapter's product as the wrapper's forward does (it used to drop it), and follows fusing,
    unfusing, per-adapter weights, the call-time scale and disabling."""
    from lcmkit.nn.lora import LoraWeights, inject_adapter, scale_lora, set_active_adapters
    from lcmkit.nn.sampling import Upsample2D

    torch.manual_seed(0)
    layer = Upsample2D(8, subpixel=subpixel).eval()
    rank = 2
    lora = LoraWeights(torch.randn(rank, 8, 3, 3), torch.randn(8, rank, 1, 1), alpha=4.0)
    inject_adapter(layer, "a", {"conv": lora})
    set_active_adapters(layer, ["a"], [0.7])
    x = torch.randn(1, 8, side, side)

    def check(what: str) -> None:
        with torch.no_grad():
            layer.subpixel = False
            expected = layer(x)  # the reference form: nearest 2x, then the wrapper's forward
            layer.subpixel = subpixel
            torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-5, msg=what)

    with torch.no_grad():
        base = F.conv2d(F.interpolate(x, scale_factor=2.0), layer.conv.weight, layer.conv.bias, padding=1)
        layer.subpixel = False
        assert (
            layer(x) - base
        ).abs().max() > 0.1  # the adapter changes the output: the checks below can fail
    check("unfused")
    with scale_lora(layer, 0.3):
        check("call-time scale")
    layer.conv.fuse(["a"], 1.0)
    check("fused")
    layer.conv.unfuse()
    check("unfused again")
    layer.conv.enabled = False
    check("disabled")
