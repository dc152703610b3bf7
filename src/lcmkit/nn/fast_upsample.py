"""Nearest 2x upsampling followed by a 3x3 conv, computed on the low-resolution input (sub-pixel form).

After nearest 2x upsampling, each 3x3 window of the big image covers only 2x2 distinct input pixels, and which
kernel taps land on the same pixel depends only on the output pixel's phase (row parity a, column parity b). So

    conv3x3(up2(x))[2i + a, 2j + b] = sum_{p, q in {0, 1}} K_ab[p, q] . x[i - 1 + a + p, j - 1 + b + q]

with K_ab = R_a W R_b^T, where R_0 = [[1, 0, 0], [0, 1, 1]] and R_1 = [[1, 1, 0], [0, 0, 1]] merge the taps that
fall on the same input row (column). Zero padding of the big image is zero padding of x by one pixel. That is four
2x2 convs on x instead of one 3x3 conv on a 4x larger image: 16 instead of 36 multiply-adds per 2x2 output block
and channel pair, and the 4x upsampled input is never built. The result equals the plain path up to float
rounding (the merged taps W[1] + W[2] are summed before the multiply instead of after).

All four phases run as one conv with 4 * C_out output channels on the padded input, then are interleaved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lcmkit.nn.layout import is_channels_last

# R_a for a = 0, 1: which of the 3 kernel taps fall on the first and on the second of the 2 input rows (columns).
_MERGE = (((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1)))


def _phase_map(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The linear map vec(W) (9 taps) -> vec(K_ab) for a, b, p, q (16 taps): M[abpq, kl] = R_a[p, k] R_b[q, l]."""
    r = torch.tensor(_MERGE, dtype=dtype, device=device)
    return torch.einsum("apk,bql->abpqkl", r, r).reshape(16, 9)


def subpixel_kernels(weight: torch.Tensor) -> torch.Tensor:
    """3x3 kernels (C_out, C_in, 3, 3) -> the four phase kernels stacked as (4 * C_out, C_in, 2, 2).

    Output channel `phase * C_out + o` holds K_ab for output channel o, phase = 2a + b. The merged taps (sums of up
    to four weights) are computed in at least float32 and rounded once to the weight's dtype.
    """
    if weight.ndim != 4 or tuple(weight.shape[-2:]) != (3, 3):
        raise ValueError(
            f"subpixel_kernels needs 3x3 conv weights (C_out, C_in, 3, 3), got {tuple(weight.shape)}"
        )
    c_out, c_in = weight.shape[:2]
    w = weight.float() if weight.element_size() < 4 else weight  # differentiable: gradients reach `weight`
    k = w.reshape(c_out * c_in, 9) @ _phase_map(w.dtype, w.device).T  # (C_out * C_in, a b p q)
    k = k.view(c_out, c_in, 2, 2, 2, 2).permute(2, 3, 0, 1, 4, 5)
    return k.reshape(4 * c_out, c_in, 2, 2).to(weight.dtype)


def nearest2x_conv3x3(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    kernels: torch.Tensor | None = None,
) -> torch.Tensor:
    """`F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)` in sub-pixel form.

    x: (B, C_in, H, W), any H, W >= 1; returns (B, C_out, 2H, 2W). `kernels` may pass `subpixel_kernels(weight)`
    precomputed, to save recomputing them on every call.
    """
    if x.ndim != 4:
        raise ValueError(f"nearest2x_conv3x3 expects (batch, channels, height, width), got {tuple(x.shape)}")
    if kernels is None:
        kernels = subpixel_kernels(weight)
    c_out = weight.shape[0]
    if tuple(kernels.shape) != (4 * c_out, x.shape[1], 2, 2):
        raise ValueError(
            f"kernels of shape {tuple(kernels.shape)} do not fit weight {tuple(weight.shape)} and input "
            f"{tuple(x.shape)}; expected {(4 * c_out, x.shape[1], 2, 2)}"
        )
    b, _, h, w = x.shape
    # y[:, phase * C_out + o, r, c] sums the 2x2 window whose top-left is padded pixel (r, c), i.e. input (r-1, c-1)
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), kernels, None if bias is None else bias.repeat(4))
    if is_channels_last(x) and is_channels_last(y):
        # interleave in (B, H, W, C) memory: every copy moves runs of C_out contiguous values (an NCHW interleave
        # of channels-last data would gather single values and, at 256 ch x 256², cost ~10x as long)
        y = y.permute(0, 2, 3, 1).view(b, h + 1, w + 1, 2, 2, c_out)
        out = x.new_empty(b, h, 2, w, 2, c_out)
        for a in (0, 1):
            for c in (0, 1):
                out[:, :, a, :, c] = y[:, a : a + h, c : c + w, a, c]
        return out.view(b, 2 * h, 2 * w, c_out).permute(0, 3, 1, 2)
    y = y.view(b, 2, 2, c_out, h + 1, w + 1)
    out = x.new_empty(b, c_out, h, 2, w, 2)
    for a in (0, 1):
        for c in (0, 1):
            out[:, :, :, a, :, c] = y[:, a, c, :, a : a + h, c : c + w]
    return out.view(b, c_out, 2 * h, 2 * w)
