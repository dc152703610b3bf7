"""Training data: a seedable synthetic world of captioned shape scenes, and readers for captioned image sets.

Every dataset yields `(image, caption)` with `image` a float32 (3, H, W) tensor in [-1, 1], the range the VAE
expects, so the default collate gives `(images (B, 3, H, W), captions list[str])`.

The synthetic world exists so that lcmkit can train and evaluate a real (tiny) LCM with no download: scenes of
one or two flat shapes whose attributes are known exactly. Each sample keeps a structured `SceneRecord`, so an
evaluation classifier can check that generated images show what their captions say.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 190),
    "orange": (245, 130, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# Centre of each named position, as fractions of the image side (x, y).
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
# Half-extent of a shape (circle radius, half the square's side), as a fraction of the image side. With the
# positions above, a large shape never reaches another position's centre, so no shape hides another's centre.
SIZES: dict[str, float] = {"small": 0.1, "large": 0.18}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ShapeRecord:
    """One shape of a scene. `cx`, `cy` (pixels) is its centre, `radius` its half-extent in pixels."""

    shape: str
    colour: str
    position: str
    size: str
    cx: float
    cy: float
    radius: float

    @property
    def phrase(self) -> str:
        return self.partial_phrase()

    def partial_phrase(self, size: bool = True, position: bool = True) -> str:
        """The phrase, optionally without its size word or its position ("a red circle" at the least)."""
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        words = ["a", self.size if size else "", self.colour, self.shape, where if position else ""]
        return " ".join(w for w in words if w)


@dataclass(frozen=True)
class SceneRecord:
    """The ground truth of one synthetic image: its shapes (in drawing order) and background colour."""

    shapes: tuple[ShapeRecord, ...]
    background: str
    image_size: int

    @property
    def caption(self) -> str:
        """E.g. "a large red circle at the top left and a small green square in the center on a blue background"."""
        return " and ".join(s.phrase for s in self.shapes) + f" on a {self.background} background"

    def loose_caption(self, rng: np.random.Generator, p_omit: float) -> str:
        """The caption with each shape's size word, and independently its position, left out with probability
        `p_omit`: how people write prompts ("a red circle on a blue background"). Training on such captions
        teaches a model what an unnamed attribute means (any value), instead of leaving those prompts unseen."""
        phrases = [
            s.partial_phrase(size=rng.random() >= p_omit, position=rng.random() >= p_omit)
            for s in self.shapes
        ]
        return " and ".join(phrases) + f" on a {self.background} background"

    def to_dict(self) -> dict:
        """JSON-ready attributes (with the caption), e.g. for an evaluation classifier's labels."""
        return {**asdict(self), "shapes": [asdict(s) for s in self.shapes], "caption": self.caption}


@dataclass(frozen=True)
class WorldConfig:
    """What the synthetic world may draw. Scene `i` depends only on (`seed`, `i`), never on what was drawn before."""

    image_size: int = 64
    seed: int = 0
    min_shapes: int = 1
    max_shapes: int = 2
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    positions: tuple[str, ...] = tuple(POSITIONS)
    sizes: tuple[str, ...] = tuple(SIZES)
    jitter: float = 0.02  # uniform centre offset, as a fraction of the image side, in x and y
    # Probability that a training caption leaves out a shape's size word (and, independently, its position);
    # the image is drawn with them all the same. 0 gives full captions (`SceneRecord.caption`) everywhere.
    caption_omit: float = 0.0

    def __post_init__(self) -> None:
        for name, allowed in (
            ("shapes", SHAPES),
            ("colours", tuple(COLOURS)),
            ("positions", tuple(POSITIONS)),
            ("sizes", tuple(SIZES)),
        ):
            unknown = sorted(set(getattr(self, name)) - set(allowed))
            if unknown or not getattr(self, name):
                raise ValueError(
                    f"WorldConfig.{name} must be a non-empty subset of {list(allowed)}, got {unknown}"
                )
        if not 1 <= self.min_shapes <= self.max_shapes <= len(self.positions):
            raise ValueError(
                f"need 1 <= min_shapes <= max_shapes <= number of positions ({len(self.positions)}), "
                f"got min_shapes={self.min_shapes}, max_shapes={self.max_shapes}"
            )
        if len(self.colours) < 2:
            raise ValueError(
                "WorldConfig.colours needs at least 2 colours (shapes must differ from the background)"
            )
        if not 0 <= self.caption_omit <= 1:
            raise ValueError(
                f"WorldConfig.caption_omit must be a probability in [0, 1], got {self.caption_omit}"
            )
        if self.image_size < 8:
            raise ValueError(f"WorldConfig.image_size must be at least 8 pixels, got {self.image_size}")
        if not 0 <= self.jitter <= 0.03:
            raise ValueError(
                f"WorldConfig.jitter must be in [0, 0.03] (larger lets shapes cover others), got {self.jitter}"
            )


def world_words(config: WorldConfig | None = None) -> list[str]:
    """Every word a caption of the world can contain (sorted), e.g. to build a word-level tokenizer."""
    config = config or WorldConfig()
    words = {"a", "at", "the", "in", "and", "on", "background"}
    for group in (config.shapes, config.colours, config.positions, config.sizes):
        for item in group:
            words.update(item.split())
    return sorted(words)


def sample_scene(config: WorldConfig, index: int) -> SceneRecord:
    """Draw scene `index` of the world: 1..max_shapes shapes at distinct positions, colours unlike the background."""
    rng = np.random.default_rng([config.seed, index])
    background = config.colours[rng.integers(len(config.colours))]
    shape_colours = [c for c in config.colours if c != background]
    n = int(rng.integers(config.min_shapes, config.max_shapes + 1))
    positions = rng.choice(len(config.positions), size=n, replace=False)
    side = config.image_size
    shapes = []
    for p in positions:
        position = config.positions[int(p)]
        size = config.sizes[rng.integers(len(config.sizes))]
        fx, fy = POSITIONS[position]
        dx, dy = rng.uniform(-config.jitter, config.jitter, size=2)
        shapes.append(
            ShapeRecord(
                shape=config.shapes[rng.integers(len(config.shapes))],
                colour=shape_colours[rng.integers(len(shape_colours))],
                position=position,
                size=size,
                cx=float((fx + dx) * side),
                cy=float((fy + dy) * side),
                radius=SIZES[size] * side,
            )
        )
    return SceneRecord(shapes=tuple(shapes), background=background, image_size=side)


def render_scene(record: SceneRecord) -> np.ndarray:
    """Draw a scene as a (H, W, 3) uint8 array: flat colours, no antialiasing, shapes in record order."""
    side = record.image_size
    image = Image.new("RGB", (side, side), COLOURS[record.background])
    draw = ImageDraw.Draw(image)
    for s in record.shapes:
        x, y, r = s.cx, s.cy, s.radius
        fill = COLOURS[s.colour]
        if s.shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif s.shape == "square":
            draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
        elif s.shape == "triangle":
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
        elif s.shape == "diamond":
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
        else:
            raise ValueError(f"unknown shape {s.shape!r}; known shapes: {list(SHAPES)}")
    return np.asarray(image)


def to_tensor(image: np.ndarray | Image.Image) -> torch.Tensor:
    """uint8 (H, W, 3) pixels -> float32 (3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


class SyntheticShapes(Dataset):
    """`length` scenes of the synthetic world; item i is `(image, caption)`, `record(i)` its ground truth."""

    def __init__(self, config: WorldConfig | None = None, length: int = 1_000_000) -> None:
        self.config = config or WorldConfig()
        self.length = length

    def __len__(self) -> int:
        return self.length

    def record(self, index: int) -> SceneRecord:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is outside the dataset of {self.length} scenes")
        return sample_scene(self.config, index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return to_tensor(render_scene(self.record(index))), self.caption(index)

    def caption(self, index: int) -> str:
        """Item `index`'s caption, without drawing its image."""
        record = self.record(index)
        if self.config.caption_omit == 0:
            return record.caption
        # Its own stream (not the scene's), so the scenes stay those of the same world without omission.
        rng = np.random.default_rng([self.config.seed, index, 1])
        return record.loose_caption(rng, self.config.caption_omit)


# ----------------------------------------------------------------------------------------------------------------------
# Captioned image sets on disk


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """Read an image, resize its short side to `size` (bicubic), centre-crop to a square: (3, size, size) in [-1, 1]."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = size / min(image.size)
        w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        return to_tensor(image.crop((left, top, left + size, top + size)))


@dataclass
class _CaptionedFiles(Dataset):
    items: list[tuple[Path, str]]
    size: int = 64
    source: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if not self.items:
            raise ValueError(f"{self.source} holds no captioned images")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path, caption = self.items[index]
        return load_image(path, self.size), caption

    def caption(self, index: int) -> str:
        return self.items[index][1]


def image_folder_dataset(folder: str | Path, size: int = 64) -> Dataset:
    """Every image in `folder` (sorted, not recursive) with the caption in the `.txt` file of the same stem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} does not exist or is not a folder")
    items = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        caption_file = path.with_suffix(".txt")
        if not caption_file.is_file():
            raise ValueError(f"{path.name} has no caption: expected {caption_file.name} next to it")
        items.append((path, caption_file.read_text(encoding="utf-8").strip()))
    return _CaptionedFiles(items, size, source=f"folder {folder} (image suffixes {list(IMAGE_SUFFIXES)})")


def jsonl_dataset(path: str | Path, size: int = 64) -> Dataset:
    """Lines of `{"image": path, "text": caption}`; relative image paths are relative to the JSONL file's folder."""
    path = Path(path)
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number} is not valid JSON: {e}") from None
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("image"), str)
            or not isinstance(entry.get("text"), str)
        ):
            raise ValueError(
                f'{path}:{number} must be an object with string fields "image" and "text", got {line!r}'
            )
        image = Path(entry["image"])
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise ValueError(f"{path}:{number} names an image that does not exist: {image}")
        items.append((image, entry["text"]))
    return _CaptionedFiles(items, size, source=f"JSONL file {path}")


def open_dataset(source: str | Path | None, size: int = 64, world: WorldConfig | None = None) -> Dataset:
    """`None` -> the synthetic world at `size`; a folder -> `image_folder_dataset`; a `.jsonl` file -> `jsonl_dataset`."""
    if source is None:
        world = world or WorldConfig(image_size=size)
        if world.image_size != size:
            raise ValueError(f"the world draws {world.image_size}px images but {size}px were asked for")
        return SyntheticShapes(world)
    source = Path(source)
    if source.is_dir():
        return image_folder_dataset(source, size)
    if source.suffix == ".jsonl":
        return jsonl_dataset(source, size)
    raise ValueError(f"data source {source} must be a folder of images with .txt captions or a .jsonl file")
