"""Image pre- and post-processing around the VAE.

Behaviour follows diffusers' ``VaeImageProcessor`` with its default config (the one the LCM pipelines build):
resize to a multiple of the VAE scale factor by flooring, PIL images with Lanczos, arrays and tensors with
nearest-neighbour ``F.interpolate``; [0, 1] → [-1, 1] on the way in and back on the way out.

Where the reference lets bad input through to fail later inside the VAE (grey-scale or RGBA images, integer
arrays, mixed lists), we raise a ``ValueError``/``TypeError`` up front that says what is allowed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ImageInput = (
    PIL.Image.Image
    | np.ndarray
    | torch.Tensor
    | Sequence[PIL.Image.Image]
    | Sequence[np.ndarray]
    | Sequence[torch.Tensor]
)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_ALLOWED = (
    "a PIL RGB image, a float numpy array (H, W, 3) or (N, H, W, 3) with values in [0, 1], "
    "a torch tensor (3, H, W) or (N, 3, H, W) with values in [0, 1] (or 4-channel latents), or a list of one of these"
)


def numpy_to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
    """(N, H, W, C) or (H, W, C) floats in [0, 1] → list of PIL images; one channel gives mode "L"."""
    if images.ndim == 3:
        images = images[None]
    pixels = (images * 255).round().astype("uint8")
    if pixels.shape[-1] == 1:
        return [PIL.Image.fromarray(p[..., 0]) for p in pixels]
    return [PIL.Image.fromarray(p) for p in pixels]


def pil_to_numpy(images: PIL.Image.Image | Sequence[PIL.Image.Image]) -> np.ndarray:
    """PIL image(s) → (N, H, W, C) float32 in [0, 1]."""
    if isinstance(images, PIL.Image.Image):
        images = [images]
    return np.stack([np.asarray(im).astype(np.float32) / 255.0 for im in images], axis=0)


def numpy_to_pt(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) array → (N, C, H, W) tensor sharing memory (no copy, dtype kept)."""
    if images.ndim == 3:
        images = images[..., None]
    return torch.from_numpy(images.transpose(0, 3, 1, 2))


def pt_to_numpy(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) tensor → (N, H, W, C) float32 array on the CPU."""
    return images.cpu().permute(0, 2, 3, 1).float().numpy()


def normalize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] → [-1, 1], the range the VAE encoder was trained on."""
    return 2.0 * images - 1.0


def denormalize(images: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """[-1, 1] → [0, 1], clamped: VAE decodes overshoot slightly."""
    if isinstance(images, np.ndarray):
        return np.clip(images / 2 + 0.5, 0, 1)
    return (images / 2 + 0.5).clamp(0, 1)


def _floor_size(height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
    size = (height - height % vae_scale_factor, width - width % vae_scale_factor)
    if min(size) < vae_scale_factor:
        raise ValueError(
            f"image size {height}x{width} is below one VAE cell; height and width must be >= {vae_scale_factor}."
        )
    return size


def _as_list(image: ImageInput) -> list:
    """Validate the container and element kinds; return a non-empty list of one kind."""
    if isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor)):
        return [image]
    if not isinstance(image, (list, tuple)):
        raise TypeError(f"`image` has unsupported type {type(image).__name__}; expected {_ALLOWED}.")
    if len(image) == 0:
        raise ValueError(f"`image` is an empty list; expected {_ALLOWED}.")
    kinds = {PIL.Image.Image: "PIL", np.ndarray: "numpy", torch.Tensor: "torch"}
    found = []
    for item in image:
        kind = next((name for cls, name in kinds.items() if isinstance(item, cls)), None)
        if kind is None:
            raise TypeError(f"`image` list holds a {type(item).__name__}; expected {_ALLOWED}.")
        found.append(kind)
    if len(set(found)) > 1:
        raise TypeError(f"`image` list mixes kinds ({', '.join(sorted(set(found)))}); pass one kind only.")
    return list(image)


def _stack(items: list, kind: str) -> np.ndarray | torch.Tensor:
    """Batch a list of 3-D (single) or 4-D (batched) arrays/tensors into one 4-D batch."""
    ndims = {item.ndim for item in items}
    if len(ndims) > 1 or not ndims <= {3, 4}:
        shapes = ", ".join(str(tuple(item.shape)) for item in items)
        layout = "(H, W, 3) or (N, H, W, 3)" if kind == "numpy" else "(3, H, W) or (N, 3, H, W)"
        raise ValueError(f"{kind} images must all be 3-D or all be 4-D {layout}; got shapes {shapes}.")
    if kind == "numpy":
        return np.concatenate(items, axis=0) if 4 in ndims else np.stack(items, axis=0)
    return torch.cat(items, dim=0) if 4 in ndims else torch.stack(items, dim=0)


def _pil_batch(images: list[PIL.Image.Image], size: tuple[int, int]) -> torch.Tensor:
    bad = sorted({im.mode for im in images if im.mode != "RGB"})
    if bad:
        raise ValueError(
            f"PIL images must be mode 'RGB'; got mode(s) {bad}. Convert with image.convert('RGB')."
        )
    height, width = size
    # The reference resizes even at the target size (a copy); Lanczos and no reducing_gap.
    resized = [im.resize((width, height), resample=PIL.Image.Resampling.LANCZOS) for im in images]
    return numpy_to_pt(pil_to_numpy(resized))


def preprocess(
    image: ImageInput,
    vae_scale_factor: int = 8,
    height: int | None = None,
    width: int | None = None,
    latent_channels: int = 4,
) -> torch.Tensor:
    """Turn user images into a float32 (N, 3, H, W) batch in [-1, 1] for the VAE encoder.

    H and W are ``height``/``width`` (default: the first image's size) floored to a multiple of
    ``vae_scale_factor``, so the latent grid is whole. A tensor with ``latent_channels`` channels is taken as
    latents and returned unchanged. A batch whose minimum is below 0 is taken as already in [-1, 1]: we log a
    warning and do not normalise it (the reference does the same, with a FutureWarning).
    """
    if vae_scale_factor < 1:
        raise ValueError(f"`vae_scale_factor` must be a positive integer, got {vae_scale_factor}.")
    items = _as_list(image)
    first = items[0]

    if isinstance(first, PIL.Image.Image):
        h = first.height if height is None else height
        w = first.width if width is None else width
        batch = _pil_batch(items, _floor_size(h, w, vae_scale_factor))
    else:
        kind = "numpy" if isinstance(first, np.ndarray) else "torch"
        stacked = _stack(items, kind)
        if kind == "numpy":
            if not np.issubdtype(stacked.dtype, np.floating):
                raise ValueError(
                    f"numpy images must be floats in [0, 1]; got dtype {stacked.dtype}. "
                    "Divide uint8 pixels by 255 first."
                )
            if stacked.shape[-1] != 3:
                raise ValueError(
                    f"numpy images must be channels-last RGB (..., H, W, 3); got shape {tuple(stacked.shape)}."
                )
            batch = numpy_to_pt(stacked)
        else:
            channels = stacked.shape[1]
            if channels == latent_channels:
                return stacked
            if channels != 3:
                raise ValueError(
                    f"torch images must be (N, 3, H, W) RGB or (N, {latent_channels}, h, w) latents; "
                    f"got shape {tuple(stacked.shape)}."
                )
            if not stacked.is_floating_point():
                raise ValueError(f"torch images must be floats in [0, 1]; got dtype {stacked.dtype}.")
            batch = stacked
        h = batch.shape[2] if height is None else height
        w = batch.shape[3] if width is None else width
        # The reference uses F.interpolate's default (nearest) for arrays and tensors, even at the same size.
        batch = F.interpolate(batch, size=_floor_size(h, w, vae_scale_factor))

    if batch.min() < 0:
        logger.warning(
            "`image` has values in [%s, %s]; expected [0, 1]. Treating it as already normalised to [-1, 1].",
            float(batch.min()),
            float(batch.max()),
        )
    else:
        batch = normalize(batch)
    return batch.float().contiguous()


def postprocess(
    image: torch.Tensor,
    output_type: str = "pil",
    do_denormalize: Sequence[bool] | None = None,
) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
    """Turn a decoded (N, C, H, W) batch in [-1, 1] into ``output_type``.

    "latent" returns ``image`` untouched; "pt" a [0, 1] tensor; "np" a (N, H, W, C) float32 array; "pil" a list
    of images. ``do_denormalize`` lets the safety checker's black (zero) images skip the [-1, 1] → [0, 1] shift
    so they stay black. An unknown ``output_type`` logs a warning and falls back to "np", as the reference does.
    """
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"postprocess expects a torch.Tensor (N, C, H, W); got {type(image).__name__}.")
    if output_type not in OUTPUT_TYPES:
        logger.warning("output_type %r is not supported; using 'np'. Allowed: %s.", output_type, OUTPUT_TYPES)
        output_type = "np"
    if output_type == "latent":
        return image

    if do_denormalize is None:
        image = denormalize(image)
    else:
        if len(do_denormalize) != image.shape[0]:
            raise ValueError(
                f"`do_denormalize` has {len(do_denormalize)} entries but the batch has {image.shape[0]} images."
            )
        image = torch.stack(
            [denormalize(im) if flag else im for im, flag in zip(image, do_denormalize, strict=True)]
        )

    if output_type == "pt":
        return image
    array = pt_to_numpy(image)
    if output_type == "np":
        return array
    return numpy_to_pil(array)
