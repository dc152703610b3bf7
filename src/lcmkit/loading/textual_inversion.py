"""Textual-inversion embeddings (A1111 and diffusers files) added to the CLIP tokenizer and text encoder."""

from __future__ import annotations

from collections.abc import Callable


class TextualInversionLoaderMixin:
    """Pipeline methods for textual inversion."""

    def _prompt_transform(self) -> Callable[[str], str] | None:
        """A str -> str rewrite applied to every prompt before tokenising (None: nothing to rewrite)."""
        return None
