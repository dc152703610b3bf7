"""The pipeline result, shaped like diffusers' `StableDiffusionPipelineOutput` (attribute, key or index access)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class StableDiffusionPipelineOutput:
    """`images` (PIL list, numpy NHWC array or torch NCHW tensor) and per-image NSFW flags (None without a checker)."""

    images: Any
    nsfw_content_detected: list[bool] | None = None

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())
