"""ControlNet in the LCM pipelines: checking a call's control arguments, preparing the control images, and the
residuals each step adds to the UNet (diffusers' `StableDiffusionControlNetPipeline` semantics, guess mode off).

- `control_image`: one image (PIL, array, tensor, or a batch as a list) per ControlNet, or diffusers' nested form (one
  list per prompt, each with one image per net); a batch of 1 is repeated for every output, a batch of one image per
  prompt is repeated per `num_images_per_prompt`. Images are resized to the
  output size (PIL with Lanczos, arrays and tensors nearest), scaled to [0, 1] (no [-1, 1] normalisation), RGB.
- `controlnet_conditioning_scale`: one float for all nets, or one per net.
- `control_guidance_start` / `control_guidance_end`: fractions of the steps in which a net acts: at step i of n
  it acts unless i / n < start or (i + 1) / n > end (diffusers' keep rule).
- Several nets add their residuals up (diffusers' `MultiControlNetModel`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from lcmkit.io.images import numpy_to_pt, pil_to_numpy
from lcmkit.models.controlnet import ControlNetModel

ControlNets = ControlNetModel | Sequence[ControlNetModel] | None
FloatOrList = float | Sequence[float]

_IMAGE_KINDS = (
    "a PIL image, a float numpy array (H, W, C) / (N, H, W, C) or a tensor (C, H, W) / (N, C, H, W) in [0, 1]"
)


def as_net_list(controlnet: ControlNets) -> list[ControlNetModel]:
    """One ControlNet or several, as a list (empty for None)."""
    if controlnet is None:
        return []
    if isinstance(controlnet, ControlNetModel):
        return [controlnet]
    if isinstance(controlnet, (list, tuple)) and all(isinstance(c, ControlNetModel) for c in controlnet):
        return list(controlnet)
    raise TypeError(
        f"controlnet must be a lcmkit ControlNetModel, a list of them, or None; got {type(controlnet).__name__}"
    )


@dataclass
class ControlArgs:
    """A call's control arguments, one entry per net, checked."""

    images: list[Any]
    scales: list[float]
    starts: list[float]
    ends: list[float]


def _per_net(value: FloatOrList, n: int, name: str) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"`{name}` has {len(values)} entries for {n} ControlNets; pass one number or {n}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise ValueError(f"`{name}` must hold finite numbers, got {v!r}")
    return [float(v) for v in values]


def _per_net_images(nested: Sequence, n: int) -> list[list]:
    """diffusers' nested form, one list per prompt with one image per net ([[canny_1, pose_1], [canny_2, pose_2]]),
    as one list of per-prompt images per net."""
    if not all(isinstance(row, (list, tuple)) and len(row) == n for row in nested):
        raise ValueError(
            f"a nested `control_image` must be one list per prompt, each with {n} images (one per ControlNet); "
            f"got rows of lengths {[len(r) if isinstance(r, (list, tuple)) else 'not a list' for r in nested]}"
        )
    return [list(column) for column in zip(*nested, strict=True)]


def check_control_args(
    nets: list[ControlNetModel],
    control_image: Any,
    scale: FloatOrList,
    start: FloatOrList,
    end: FloatOrList,
    guess_mode: bool,
) -> ControlArgs | None:
    """Check the control arguments of a call against the pipeline's nets; None when no ControlNet is set."""
    if guess_mode:
        raise ValueError("guess_mode=True is not supported by lcmkit; use guess_mode=False (the default)")
    if not nets:
        if control_image is not None:
            raise ValueError(
                "`control_image` was given but the pipeline has no ControlNet; pass controlnet= when loading, "
                "or set pipe.controlnet"
            )
        return None
    if control_image is None:
        raise ValueError(
            f"the pipeline has {len(nets)} ControlNet(s): pass `control_image` (one per ControlNet)"
        )
    if len(nets) == 1:
        images = [control_image]
    elif isinstance(control_image, (list, tuple)) and any(
        isinstance(i, (list, tuple)) for i in control_image
    ):
        images = _per_net_images(control_image, len(nets))
    elif not isinstance(control_image, (list, tuple)) or len(control_image) != len(nets):
        got = len(control_image) if isinstance(control_image, (list, tuple)) else 1
        raise ValueError(
            f"`control_image` must be a list of {len(nets)} images, one per ControlNet; got {got}"
        )
    else:
        images = list(control_image)
    args = ControlArgs(
        images=images,
        scales=_per_net(scale, len(nets), "controlnet_conditioning_scale"),
        starts=_per_net(start, len(nets), "control_guidance_start"),
        ends=_per_net(end, len(nets), "control_guidance_end"),
    )
    for s, e in zip(args.starts, args.ends, strict=True):
        if s < 0.0 or e > 1.0 or s >= e:
            raise ValueError(
                f"control_guidance_start={s:g} and control_guidance_end={e:g}: need 0 <= start < end <= 1"
            )
    for net in nets:
        if net.config.global_pool_conditions:
            raise ValueError(
                f"the ControlNet {net.name_or_path or ''} pools its conditions globally, which needs guess mode; "
                "lcmkit does not support guess mode"
            )
    return args


def _as_items(image: Any) -> list:
    if isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor)):
        return [image]
    if isinstance(image, (list, tuple)) and image:
        return list(image)
    raise ValueError(f"a control image must be {_IMAGE_KINDS}, or a list of them; got {type(image).__name__}")


def control_image_size(image: Any, vae_scale_factor: int) -> tuple[int, int]:
    """The (height, width) an output takes from its first control image: its size floored to the VAE's cell."""
    first = _as_items(image)[0]
    if isinstance(first, PIL.Image.Image):
        h, w = first.height, first.width
    elif isinstance(first, np.ndarray):
        h, w = first.shape[-3:-1]
    elif isinstance(first, torch.Tensor):
        h, w = first.shape[-2:]
    else:
        raise ValueError(f"a control image must be {_IMAGE_KINDS}; got {type(first).__name__}")
    return h - h % vae_scale_factor, w - w % vae_scale_factor


def control_pixels(image: Any, height: int, width: int) -> torch.Tensor:
    """One net's control image(s) as a float32 (N, C, height, width) batch in [0, 1] (diffusers' control image
    processor: RGB, resized with Lanczos for PIL and nearest for arrays and tensors, not normalised)."""
    items = _as_items(image)
    if all(isinstance(i, PIL.Image.Image) for i in items):
        resized = [
            i.convert("RGB").resize((width, height), resample=PIL.Image.Resampling.LANCZOS) for i in items
        ]
        return numpy_to_pt(pil_to_numpy(resized)).float()
    if all(isinstance(i, np.ndarray) for i in items):
        arrays = [i[None] if i.ndim == 3 else i for i in items]
        if any(a.ndim != 4 for a in arrays) or not all(np.issubdtype(a.dtype, np.floating) for a in arrays):
            raise ValueError(f"numpy control images must be floats (H, W, C) or (N, H, W, C); {_IMAGE_KINDS}")
        batch = numpy_to_pt(np.concatenate(arrays, axis=0))
    elif all(isinstance(i, torch.Tensor) for i in items):
        tensors = [i[None] if i.ndim == 3 else i for i in items]
        if any(t.ndim != 4 for t in tensors) or not all(t.is_floating_point() for t in tensors):
            raise ValueError(
                f"tensor control images must be floats (C, H, W) or (N, C, H, W); {_IMAGE_KINDS}"
            )
        batch = torch.cat(tensors, dim=0)
    else:
        raise ValueError(f"a control image list must hold one kind of image: {_IMAGE_KINDS}")
    return F.interpolate(batch.float(), size=(height, width))


def prepare_control_image(
    image: Any,
    height: int,
    width: int,
    prompts: int,
    per_prompt: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """`control_pixels`, repeated to one row per output: a single image for all, or one per prompt."""
    pixels = control_pixels(image, height, width)
    if pixels.shape[0] == 1:
        repeat = prompts * per_prompt
    elif pixels.shape[0] == prompts:
        repeat = per_prompt
    else:
        raise ValueError(
            f"a ControlNet got {pixels.shape[0]} control images for {prompts} prompt(s); pass 1 or one per prompt"
        )
    return pixels.repeat_interleave(repeat, dim=0).to(device=device, dtype=dtype)


@dataclass
class ControlRun:
    """The ControlNets of one call, with their prepared images; called once per step with the UNet's batch, it
    returns the summed residuals (or None when no net acts at this step)."""

    nets: list[ControlNetModel]
    images: list[torch.Tensor]
    scales: list[float]
    keep: list[list[float]]  # keep[step][net]: 1.0 when the net acts at that step, else 0.0
    step: int = field(default=0)

    @classmethod
    def build(
        cls, nets: list[ControlNetModel], args: ControlArgs, images: list[torch.Tensor], steps: int
    ) -> ControlRun:
        keep = [
            [
                1.0 - float(i / steps < s or (i + 1) / steps > e)
                for s, e in zip(args.starts, args.ends, strict=True)
            ]
            for i in range(steps)
        ]
        return cls(nets, images, args.scales, keep)

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, w_embedding: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        keep = self.keep[min(self.step, len(self.keep) - 1)]
        self.step += 1
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        for net, image, scale, k in zip(self.nets, self.images, self.scales, keep, strict=True):
            if scale * k == 0.0:  # residuals times 0: adding them would change nothing
                continue
            if image.shape[0] != x.shape[0]:  # classifier-free guidance: [negative, prompt] halves
                image = torch.cat([image] * (x.shape[0] // image.shape[0]))
            d, m = net(x, t, context, image, scale * k, timestep_cond=w_embedding, return_dict=False)
            down = d if down is None else [a + b for a, b in zip(down, d, strict=True)]
            mid = m if mid is None else mid + m
        return None if down is None else (down, mid)
