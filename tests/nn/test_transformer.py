"""`SpatialTransformer`: proj_in / proj_out as matrix products on the map's memory equal calling them as modules."""

from __future__ import annotations

import pytest
import torch

from lcmkit.nn.transformer import SpatialTransformer


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_projection_products_equal_the_module_calls(linear, dtype):
    """The default path (products on the map's memory, residual summed into the out-projection) against the path
    that calls proj_in / proj_out as modules (taken, for instance, while a forward hook watches them)."""
    torch.manual_seed(0)
    layer = SpatialTransformer(
        16, heads=2, dim_head=8, context_dim=12, groups=4, use_linear_projection=linear
    )
    layer = layer.to(dtype).eval()
    x = torch.randn(2, 16, 6, 5, dtype=dtype)
    context = torch.randn(2, 7, 12, dtype=dtype)
    seen = []
    with torch.no_grad():
        direct = layer(x, context)
        hook = layer.proj_out.register_forward_hook(lambda _m, _a, out: seen.append(out.shape))
        try:
            through_modules = layer(x, context)
        finally:
            hook.remove()
    assert len(seen) == 1  # the hook saw proj_out: the module path ran
    assert direct.shape == x.shape and direct.is_contiguous()
    torch.testing.assert_close(
        direct, through_modules, atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=0
    )
    assert not torch.equal(direct, x)  # the transformer added something to the residual


def test_captured_graphs_keep_the_reference_layers():
    """Traced (and so OpenVINO/ONNX-converted) graphs call proj_in / proj_out as the 1x1 convs they are."""
    torch.manual_seed(0)
    layer = SpatialTransformer(16, heads=2, dim_head=8, context_dim=12, groups=4).eval()
    x, context = torch.randn(1, 16, 6, 5), torch.randn(1, 7, 12)
    with torch.no_grad():
        traced = torch.jit.trace(layer, (x, context), check_trace=False)
        torch.testing.assert_close(traced(x, context), layer(x, context), atol=1e-5, rtol=0)
    graph = str(traced.inlined_graph)
    assert graph.count("aten::_convolution") == 2 and "aten::baddbmm" not in graph
