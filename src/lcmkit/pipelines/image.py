"""Image conversion; it lives in `lcmkit.io.images` (the lowest layer, so the safety checker can use it) and is
re-exported here."""

from lcmkit.io.images import (  # noqa: F401
    OUTPUT_TYPES,
    ImageInput,
    denormalize,
    normalize,
    numpy_to_pil,
    numpy_to_pt,
    pil_to_numpy,
    postprocess,
    preprocess,
    pt_to_numpy,
)

__all__ = [
    "OUTPUT_TYPES",
    "ImageInput",
    "denormalize",
    "normalize",
    "numpy_to_pil",
    "numpy_to_pt",
    "pil_to_numpy",
    "postprocess",
    "preprocess",
    "pt_to_numpy",
]
