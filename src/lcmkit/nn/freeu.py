"""FreeU (Si et al. 2023, arXiv:2309.11497): re-weight backbone and skip features in the UNet decoder.

The decoder's backbone features `h` carry the denoising signal; the encoder's skip features carry high-frequency
detail that can dominate. FreeU amplifies half of the backbone channels by `b` and damps the lowest
frequencies of the skip features by `s`, on the two deepest up stages only. This is the constant-factor
("v1") form that diffusers implements; the later channel-mean-weighted variant is not used.
"""

from __future__ import annotations

import torch


def fourier_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """Scale the centred `2*threshold` x `2*threshold` box of low frequencies of `x` (B, C, H, W) by `scale`.

    The FFT always runs in float32: fp16 would give the unstable complex32, bf16 has no FFT, and diffusers
    also downcasts float64 to float32 here. The result is cast back to the input dtype.
    """
    x_freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    h, w = x_freq.shape[-2:]
    ch, cw = h // 2, w // 2
    # Multiplying only the box equals diffusers' dense mask of ones (times 1 is exact), without the mask.
    x_freq[..., ch - threshold : ch + threshold, cw - threshold : cw + threshold] *= scale
    x_filtered = torch.fft.ifftn(torch.fft.ifftshift(x_freq, dim=(-2, -1)), dim=(-2, -1)).real
    return x_filtered.to(x.dtype)


def apply_freeu(
    resolution_idx: int,
    h: torch.Tensor,
    skip: torch.Tensor,
    s1: float,
    s2: float,
    b1: float,
    b2: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FreeU at one skip concatenation of up block `resolution_idx` (0 = deepest): returns new `(h, skip)`.

    Stage 0 uses (b1, s1), stage 1 uses (b2, s2); other stages pass through unchanged.
    The first `C // 2` backbone channels are multiplied by `b`; the skip goes through `fourier_filter(threshold=1)`.
    Unlike diffusers, `h` is not modified in place (same values; the caller's tensor stays intact).
    """
    if resolution_idx not in (0, 1):
        return h, skip
    b, s = (b1, s1) if resolution_idx == 0 else (b2, s2)
    half = h.shape[1] // 2
    h = torch.cat([h[:, :half] * b, h[:, half:]], dim=1)
    return h, fourier_filter(skip, threshold=1, scale=s)
