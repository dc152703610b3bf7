"""Gaussian noise drawn exactly as diffusers draws it, so one seeded generator gives the same images.

Parity with diffusers depends on *how* the noise is drawn, not only on the seed: the device the
numbers are generated on, the dtype, the shape of each `torch.randn` call and their order all change
the bits. The rules kept here (those of diffusers' `randn_tensor`):

1. A CPU generator always draws on the CPU, even when the tensor is wanted on an accelerator; the
   result is then moved. A CUDA generator cannot fill a tensor for another device type.
2. A list of generators draws one `(1, ...)` slice per batch element, generator `i` for element `i`,
   and concatenates them; a list of one generator behaves like that single generator.
3. Without a generator the draw uses torch's global RNG on the target device.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

# Device types that cannot draw random numbers themselves: we draw on the CPU and move the result.
_CPU_DRAW_DEVICE_TYPES = ("neuron",)


def randn_like_reference(
    shape: Sequence[int],
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise of `shape` on `device`, drawn bit-for-bit like diffusers' `randn_tensor`.

    `device=None` means the CPU for the result; the draw itself then happens on torch's default device,
    as in the reference. The layout argument of the reference is not supported (always strided).
    """
    shape = tuple(shape)
    if isinstance(device, str):
        device = torch.device(device)
    draw_device: torch.device | str | None = device
    device = device or torch.device("cpu")
    if device.type in _CPU_DRAW_DEVICE_TYPES:
        draw_device = torch.device("cpu")

    if generator is not None:
        gen_type = generator[0].device.type if isinstance(generator, list) else generator.device.type
        if gen_type != device.type and gen_type == "cpu":
            draw_device = "cpu"
            if device.type not in ("mps", *_CPU_DRAW_DEVICE_TYPES):
                logger.info(
                    "The generator lives on 'cpu' but the noise is wanted on %s: drawing on 'cpu' and moving it. "
                    "A generator created on %s would avoid the copy (but gives different numbers).",
                    device,
                    device,
                )
        elif gen_type != device.type and gen_type == "cuda":
            raise ValueError(
                f"Cannot draw a {device} tensor with a generator on {gen_type}: "
                f"use a generator on 'cpu' or on {device.type}."
            )

    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]

    if isinstance(generator, list):
        batch_size = shape[0]
        if len(generator) != batch_size:
            raise ValueError(
                f"Got a list of {len(generator)} generators for a batch of {batch_size}: "
                "pass one generator per batch element, or a single generator."
            )
        slice_shape = (1, *shape[1:])
        slices = [torch.randn(slice_shape, generator=g, device=draw_device, dtype=dtype) for g in generator]
        return torch.cat(slices, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
