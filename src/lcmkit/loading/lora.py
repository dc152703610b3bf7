"""LoRA adapters (kohya and PEFT/diffusers files) on lcmkit's UNet and the CLIP text encoder."""

from __future__ import annotations


class LoraLoaderMixin:
    """Pipeline methods for LoRA: load, weight, fuse, unfuse, unload."""
