"""Control images for ControlNet, made without downloaded models: Canny edges (numpy and Pillow only), and the
kinds whose image the user brings as it is (a depth map, a pose skeleton, a normal map, line art, a scribble, ...).

`CONTROL_MODELS` maps each kind to the SD 1.5 ControlNet v1.1 model (lllyasviel, hub id) trained on it, the
default the CLI loads for `--control KIND=IMAGE`. This module imports nothing from lcmkit: any layer may use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image

# kind -> hub id of lllyasviel's SD 1.5 ControlNet v1.1 for it (https://huggingface.co/lllyasviel)
CONTROL_MODELS: dict[str, str] = {
    "canny": "lllyasviel/control_v11p_sd15_canny",
    "depth": "lllyasviel/control_v11f1p_sd15_depth",
    "pose": "lllyasviel/control_v11p_sd15_openpose",
    "openpose": "lllyasviel/control_v11p_sd15_openpose",
    "normal": "lllyasviel/control_v11p_sd15_normalbae",
    "lineart": "lllyasviel/control_v11p_sd15_lineart",
    "lineart_anime": "lllyasviel/control_v11p_sd15s2_lineart_anime",
    "scribble": "lllyasviel/control_v11p_sd15_scribble",
    "softedge": "lllyasviel/control_v11p_sd15_softedge",
    "seg": "lllyasviel/control_v11p_sd15_seg",
    "mlsd": "lllyasviel/control_v11p_sd15_mlsd",
    "tile": "lllyasviel/control_v11f1e_sd15_tile",
    "ip2p": "lllyasviel/control_v11e_sd15_ip2p",
}
# kinds whose control image is computed here from an ordinary picture; every other kind takes the image as given
COMPUTED_KINDS = ("canny",)
# preprocessors a ControlUnit can run (A1111's module names): None = the kind's own, "none" = the image as it is
MODULES = (None, "none", "canny")


def _gaussian_blur(gray: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (kernel radius 3 sigma), edges reflected."""
    radius = max(1, math.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    padded = np.pad(gray, radius, mode="reflect")
    rows = sum(k * padded[:, i : i + gray.shape[1]] for i, k in enumerate(kernel))
    return sum(k * rows[i : i + gray.shape[0], :] for i, k in enumerate(kernel))


def _sobel(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal and vertical 3x3 Sobel derivatives (replicated border)."""
    p = np.pad(gray, 1, mode="edge")
    h, w = gray.shape

    def at(dy: int, dx: int) -> np.ndarray:
        return p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    return gx, gy


def _non_max_suppression(mag: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Keep a pixel only where its gradient magnitude is a maximum across the edge (direction in 4 bins)."""
    angle = (np.degrees(np.arctan2(gy, gx)) + 180.0) % 180.0
    p = np.pad(mag, 1)
    h, w = mag.shape

    def shifted(dy: int, dx: int) -> np.ndarray:
        return p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    keep = np.zeros_like(mag, dtype=bool)
    # image rows grow downwards: a gradient at +45 degrees points to (dy=+1, dx=+1)
    for low, high, (dy, dx) in (
        (0, 22.5, (0, 1)),
        (22.5, 67.5, (1, 1)),
        (67.5, 112.5, (1, 0)),
        (112.5, 157.5, (1, -1)),
        (157.5, 180.1, (0, 1)),
    ):
        sel = (angle >= low) & (angle < high)
        keep |= sel & (mag >= shifted(dy, dx)) & (mag > shifted(-dy, -dx))
    return np.where(keep, mag, 0.0)


def _hysteresis(mag: np.ndarray, low: float, high: float) -> np.ndarray:
    """Strong pixels (>= high), plus weak ones (>= low) 8-connected to a strong one through weak ones."""
    weak = mag >= low
    edges = mag >= high
    stack = list(zip(*np.nonzero(edges), strict=True))
    h, w = mag.shape
    while stack:
        y, x = stack.pop()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ny, nx = y + dy, x + dx
                if 0 <= ny < h and 0 <= nx < w and weak[ny, nx] and not edges[ny, nx]:
                    edges[ny, nx] = True
                    stack.append((ny, nx))
    return edges


def canny(
    image: PIL.Image.Image | np.ndarray, low: float = 100, high: float = 200, sigma: float = 1.0
) -> PIL.Image.Image:
    """Canny edges (Canny 1986) as the ControlNet canny model expects them: white edges on black, RGB.

    Grey levels 0-255 are blurred (Gaussian, `sigma`; 0 = none), differentiated with 3x3 Sobel filters, thinned by
    non-maximum suppression, and traced by hysteresis between `low` and `high` on the gradient magnitude (the
    scale of OpenCV's `Canny(..., L2gradient=True)`, whose 100/200 defaults the ControlNet annotator uses).
    """
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds need 0 <= low <= high, got low={low}, high={high}")
    if sigma < 0:
        raise ValueError(f"canny sigma must be >= 0, got {sigma}")
    if isinstance(image, np.ndarray):
        array = image
        if np.issubdtype(array.dtype, np.floating):
            array = np.clip(array * 255.0, 0, 255).round()
        image = PIL.Image.fromarray(array.astype(np.uint8))
    if not isinstance(image, PIL.Image.Image):
        raise ValueError(f"canny takes a PIL image or a numpy array, got {type(image).__name__}")
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    if sigma > 0:
        gray = _gaussian_blur(gray, sigma)
    gx, gy = _sobel(gray)
    edges = _hysteresis(_non_max_suppression(np.hypot(gx, gy), gx, gy), low, high)
    pixels = np.where(edges, 255, 0).astype(np.uint8)
    return PIL.Image.fromarray(np.stack([pixels] * 3, axis=-1))


def control_image_for(kind: str, image: PIL.Image.Image) -> PIL.Image.Image:
    """The control image of `kind` from a user's picture: computed for the kinds in `COMPUTED_KINDS` (canny),
    the picture itself (as RGB) for every other kind (a depth map, a pose skeleton, ...)."""
    if kind not in CONTROL_MODELS:
        raise ValueError(f"unknown control kind {kind!r}; known: {', '.join(sorted(CONTROL_MODELS))}")
    if kind == "canny":
        return canny(image)
    return image.convert("RGB")


def check_control_settings(kind: str, scale: float = 1.0, start: float = 0.0, end: float = 1.0) -> None:
    """A ValueError saying what is wrong with a control's kind, weight or step fractions (0 <= start < end <= 1)."""
    if kind not in CONTROL_MODELS:
        raise ValueError(f"unknown control kind {kind!r}; known: {', '.join(sorted(CONTROL_MODELS))}")
    for name, value in (("scale", scale), ("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"control {kind}: {name} must be a finite number, got {value!r}")
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(
            f"control {kind}: start={start:g}, end={end:g}; need 0 <= start < end <= 1 (fractions of the steps)"
        )


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet of a request, as the CLI (`--control`) and a server fill it: its kind, the user's picture,
    its weight and the fractions of the steps it acts in, and the model (None: `CONTROL_MODELS[kind]`).

    `module` is the preprocessor (A1111's name): None runs the kind's own (`control_image_for`), "none" takes the
    image as it is, "canny" computes edges between the thresholds `low` and `high` whatever the kind.
    """

    kind: str
    image: PIL.Image.Image
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    model: str | None = None
    module: str | None = None
    low: float = 100.0
    high: float = 200.0

    def __post_init__(self) -> None:
        if self.kind not in CONTROL_MODELS:
            raise ValueError(
                f"unknown control kind {self.kind!r}; known: {', '.join(sorted(CONTROL_MODELS))}"
            )
        for name in ("scale", "start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"control {self.kind}: {name} must be a finite number, got {value!r}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(
                f"control {self.kind}: start={self.start:g}, end={self.end:g}; need 0 <= start < end <= 1 "
                "(fractions of the steps)"
            )
        if self.module not in MODULES:
            raise ValueError(
                f"control module must be one of {[m for m in MODULES if m]}, got {self.module!r}"
            )
        if not 0 <= self.low <= self.high:
            raise ValueError(f"canny thresholds need 0 <= low <= high, got low={self.low}, high={self.high}")

    def control_image(self) -> PIL.Image.Image:
        """The image the ControlNet reads, made by `module`."""
        if self.module == "none":
            return self.image.convert("RGB")
        if self.module == "canny":
            return canny(self.image, self.low, self.high)
        return control_image_for(self.kind, self.image)

    @property
    def source(self) -> str:
        """The ControlNet to load: `model`, else lllyasviel's SD 1.5 model of the kind (a hub id)."""
        return self.model or CONTROL_MODELS[self.kind]


def control_call_kwargs(units: Sequence[ControlUnit | None]) -> dict[str, Any]:
    """The pipeline call's ControlNet arguments for `units` (in the order the pipeline's nets were set), with each
    control image made (`ControlUnit.control_image`); {} for none.

    A None entry turns its net off for this call (a server keeps every net loaded while a request uses some): it
    gets a blank 8x8 image at weight 0, and a net at weight 0 is not even run (`ControlRun` skips it), so the
    image is the one the pipeline makes without that net. Give the call its height and width then: the pipeline
    otherwise takes the size of the first control image.
    """
    if not units:
        return {}
    off = PIL.Image.new("RGB", (8, 8))
    images = [off if u is None else u.control_image() for u in units]
    return dict(
        control_image=images if len(images) > 1 else images[0],
        controlnet_conditioning_scale=[0.0 if u is None else float(u.scale) for u in units],
        control_guidance_start=[0.0 if u is None else float(u.start) for u in units],
        control_guidance_end=[1.0 if u is None else float(u.end) for u in units],
    )
