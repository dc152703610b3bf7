"""PNG files for generated images: the A1111 `parameters` text chunk, and never overwriting what exists."""

from __future__ import annotations

from pathlib import Path

import PIL.Image


def read_image(path: Path, size: tuple[int | None, int | None]) -> PIL.Image.Image:
    """An input image as RGB; resized to `size` where either side is given (the other keeps the image's)."""
    try:
        with PIL.Image.open(path) as im:
            image = im.convert("RGB")
    except (OSError, PIL.Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    if size[0] or size[1]:
        image = image.resize((size[0] or image.width, size[1] or image.height), PIL.Image.Resampling.LANCZOS)
    return image


def save_png(image: PIL.Image.Image, folder: Path, stem: str, parameters: str) -> Path:
    """Write `stem-NNNN.png` with the first free NNNN. Exclusive create (`x`), so a file that exists, or that
    another process creates at the same moment, is never overwritten: we just take the next number."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    while not write_png(image, path := folder / f"{stem}-{n:04d}.png", parameters):
        n += 1
    return path


def write_png(image: PIL.Image.Image, path: Path, parameters: str) -> bool:
    """Write `path` with the A1111 `parameters` chunk unless it exists (False then). Exclusive create (`x`): a file
    that exists, or that another process creates at the same moment, is never overwritten."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)  # AUTOMATIC1111's key; tEXt (iTXt when not Latin-1)
    try:
        f = open(path, "xb")  # noqa: SIM115
    except FileExistsError:
        return False
    try:
        with f:
            image.save(f, format="PNG", pnginfo=info)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return True
