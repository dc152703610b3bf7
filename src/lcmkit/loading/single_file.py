"""Original Stable Diffusion single-file checkpoints: all key translation from that layout lives here."""

from __future__ import annotations


class FromSingleFileMixin:
    """`Pipeline.from_single_file(path)`."""
