"""Resolving a model name: a local folder, or a hub id fetched (or found in the cache) with huggingface_hub."""

from __future__ import annotations

from pathlib import Path


def resolve_pretrained(name_or_path: str | Path, variant: str | None = None, **hub_kwargs: object) -> Path:
    """A local folder as it is. Hub ids are not resolved yet."""
    return Path(name_or_path)
