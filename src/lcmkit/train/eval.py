"""Evaluate a tiny teacher and its LCM on the synthetic world: a table in the shape of the LCM paper's Table 1.

Two measures replace the paper's CLIP score and Inception FID, because the world's ground truth is known exactly:

- caption fidelity: a small CNN (`SceneClassifier`) trained on rendered scenes reads back the background colour
  and, for each of the world's position slots, whether it is empty or which shape, colour and size it holds.
  A generated image scores the fraction of its caption's attributes the classifier confirms;
- FID on the classifier's penultimate features: the Frechet distance between Gaussian fits of the generated and
  the real feature sets (Heusel et al. 2017), the real set being the renders of the very same scene records.
  Its unit is the classifier's feature space: compare rows of one table, not numbers with the paper's.

Rows: the teacher with DDIM (classifier-free guidance, 50 steps as the reference, and 1/2/4/8 steps) and the LCM at
1/2/4/8 steps, all from the same initial noise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from lcmkit.models.text import encode_prompt, load_text_encoder, load_tokenizer
from lcmkit.models.unet import UNet2DConditionModel
from lcmkit.models.vae import AutoencoderKL
from lcmkit.pipelines.text2img import LatentConsistencyModelPipeline
from lcmkit.schedulers.ddim import DDIMScheduler, sample_ddim
from lcmkit.train.data import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    SceneRecord,
    WorldConfig,
    render_scene,
    sample_scene,
)

logger = logging.getLogger(__name__)

SLOTS = tuple(POSITIONS)  # one classifier slot per named position, in this order
SHAPE_CLASSES = ("empty", *SHAPES)
COLOUR_NAMES = tuple(COLOURS)
SIZE_NAMES = tuple(SIZES)
IGNORE = -100  # label of colour / size at an empty slot
DEFAULT_CACHE = Path.home() / ".cache" / "lcmkit" / "scorer"
# Evaluation captions come from a world seed no training recipe uses by default.
EVAL_WORLD_SEED = 20_231_004
_SCORER_FORMAT = 1  # bump when the classifier or its training changes, so cached weights are not reused

ImageBatch = torch.Tensor | np.ndarray | Sequence[np.ndarray | Image.Image]


# ----------------------------------------------------------------------------------------------------------------------
# The scene classifier


@dataclass(frozen=True)
class ScorerConfig:
    """What the classifier learns from; scenes of up to 3 shapes so that extra shapes are seen in training."""

    world: WorldConfig = field(default_factory=lambda: WorldConfig(seed=7_777, max_shapes=3))
    train_scenes: int = 6000
    heldout_scenes: int = 1000
    epochs: int = 12
    batch_size: int = 64
    learning_rate: float = 2e-3
    width: int = 32
    feature_dim: int = 128
    augment: bool = True  # blur, noise and colour shifts, so decoded (soft, noisy) images still read
    seed: int = 0

    def key(self) -> str:
        text = json.dumps({"format": _SCORER_FORMAT, **asdict(self)}, sort_keys=True, default=list)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


class SceneClassifier(nn.Module):
    """A 4x4 patch stem and two stride-2 convs down to a 4x4 grid (flattened: slots are places), a `feature_dim`
    layer (the FID features), one linear head per attribute. 64x64 inputs; about 0.5M parameters."""

    def __init__(self, width: int = 32, feature_dim: int = 128) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(3, width, 4, stride=4),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.fc = nn.Sequential(nn.Linear(16 * 4 * width, feature_dim), nn.ReLU())
        n = len(SLOTS)
        self.background = nn.Linear(feature_dim, len(COLOUR_NAMES))
        self.shape = nn.Linear(feature_dim, n * len(SHAPE_CLASSES))
        self.colour = nn.Linear(feature_dim, n * len(COLOUR_NAMES))
        self.size = nn.Linear(feature_dim, n * len(SIZE_NAMES))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim): what FID compares."""
        return self.fc(self.convs(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h, b, n = self.features(x), x.shape[0], len(SLOTS)
        return {
            "background": self.background(h),
            "shape": self.shape(h).view(b, n, -1),
            "colour": self.colour(h).view(b, n, -1),
            "size": self.size(h).view(b, n, -1),
        }


def render_batch(records: Sequence[SceneRecord]) -> torch.Tensor:
    """Renders of `records` as one float (N, 3, H, W) batch in [-1, 1]."""
    pixels = np.stack([render_scene(r) for r in records])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def scene_labels(records: Sequence[SceneRecord]) -> dict[str, torch.Tensor]:
    """Class indices per attribute: background (N,), and shape / colour / size (N, slots); empty slot -> shape 0."""
    n = len(records)
    labels = {
        "background": torch.tensor([COLOUR_NAMES.index(r.background) for r in records]),
        "shape": torch.zeros(n, len(SLOTS), dtype=torch.long),
        "colour": torch.full((n, len(SLOTS)), IGNORE),
        "size": torch.full((n, len(SLOTS)), IGNORE),
    }
    for i, record in enumerate(records):
        for s in record.shapes:
            k = SLOTS.index(s.position)
            labels["shape"][i, k] = SHAPE_CLASSES.index(s.shape)
            labels["colour"][i, k] = COLOUR_NAMES.index(s.colour)
            labels["size"][i, k] = SIZE_NAMES.index(s.size)
    return labels


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per image: a 3x3 box blur mixed in (weight up to 1) on half, noise (std up to 0.08), channel shifts (up to 0.06)."""
    b = x.shape[0]
    mix = torch.rand(b, 1, 1, 1, generator=generator) * (torch.rand(b, 1, 1, 1, generator=generator) < 0.5)
    x = x + mix * (F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False) - x)
    x = x + torch.randn(x.shape, generator=generator) * torch.rand(b, 1, 1, 1, generator=generator) * 0.08
    return x + (torch.rand(b, 3, 1, 1, generator=generator) - 0.5) * 0.12


def _loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(
        F.cross_entropy(
            logits[name].reshape(-1, logits[name].shape[-1]), labels[name].reshape(-1), ignore_index=IGNORE
        )
        for name in logits
    )


class SceneScorer:
    """A trained `SceneClassifier` with its config: reads attributes and features from images of any size."""

    def __init__(self, model: SceneClassifier, config: ScorerConfig, report: dict | None = None) -> None:
        self.model = model.eval()
        self.config = config
        self.report = report or {}

    @property
    def image_size(self) -> int:
        return self.config.world.image_size

    def to(self, device: str | torch.device) -> SceneScorer:
        self.model.to(device)
        return self

    def _batches(self, images: ImageBatch, batch_size: int):
        x = as_image_batch(images)
        device = next(self.model.parameters()).device
        for start in range(0, len(x), batch_size):
            chunk = x[start : start + batch_size].to(device)
            if chunk.shape[-2:] != (self.image_size, self.image_size):
                chunk = F.interpolate(chunk, size=self.image_size, mode="bilinear", antialias=True)
            yield chunk

    @torch.no_grad()
    def predict(self, images: ImageBatch, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Predicted class indices: background (N,), shape / colour / size (N, slots)."""
        out: dict[str, list] = {"background": [], "shape": [], "colour": [], "size": []}
        for chunk in self._batches(images, batch_size):
            for name, logits in self.model(chunk).items():
                out[name].append(logits.argmax(-1).cpu())
        return {name: torch.cat(v).numpy() for name, v in out.items()}

    @torch.no_grad()
    def features(self, images: ImageBatch, batch_size: int = 256) -> np.ndarray:
        """Penultimate features (N, feature_dim) as float64."""
        feats = [self.model.features(chunk).cpu() for chunk in self._batches(images, batch_size)]
        return torch.cat(feats).double().numpy()

    def accuracy(self, records: Sequence[SceneRecord], images: ImageBatch | None = None) -> dict[str, float]:
        """Per-attribute accuracy on `images` (default: the clean renders) and whole-scene exact match."""
        pred = self.predict(render_batch(records) if images is None else images)
        labels = {k: v.numpy() for k, v in scene_labels(records).items()}
        occupied = labels["shape"] > 0
        correct = {name: pred[name] == labels[name] for name in labels}
        exact = correct["background"] & correct["shape"].all(1)
        for name in ("colour", "size"):
            exact &= (correct[name] | ~occupied).all(1)
        return {
            "background": float(correct["background"].mean()),
            "slot_shape": float(correct["shape"].mean()),
            "colour": float(correct["colour"][occupied].mean()),
            "size": float(correct["size"][occupied].mean()),
            "exact_match": float(exact.mean()),
        }


def as_image_batch(images: ImageBatch) -> torch.Tensor:
    """A float (N, 3, H, W) batch in [-1, 1] from: such a tensor, uint8 (N, H, W, 3) pixels, or a list of images."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"image tensors must be float (N, 3, H, W) in [-1, 1], got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        return images.float()
    if not isinstance(images, np.ndarray):
        images = np.stack(
            [np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im) for im in images]
        )
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"image arrays must be uint8 (N, H, W, 3) pixels, got {images.dtype} {images.shape}")
    return torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_scorer(config: ScorerConfig | None = None) -> SceneScorer:
    """Train the classifier on `config.train_scenes` renders (seeded), then measure it on held-out scenes."""
    config = config or ScorerConfig()
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    records = [sample_scene(config.world, i) for i in range(config.train_scenes)]
    pixels = torch.from_numpy(np.stack([render_scene(r) for r in records])).permute(0, 3, 1, 2).contiguous()
    labels = scene_labels(records)
    model = SceneClassifier(config.width, config.feature_dim)
    steps_per_epoch = math.ceil(len(records) / config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, config.learning_rate, total_steps=config.epochs * steps_per_epoch
    )
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(records), generator=generator)
        total = 0.0
        for start_index in range(0, len(records), config.batch_size):
            idx = order[start_index : start_index + config.batch_size]
            x = pixels[idx].float() / 127.5 - 1.0
            if config.augment:
                x = _augment(x, generator)
            loss = _loss(model(x), {k: v[idx] for k, v in labels.items()})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach())
        logger.info("scorer epoch %d/%d: loss %.4f", epoch + 1, config.epochs, total / steps_per_epoch)
    heldout_world = replace(config.world, seed=config.world.seed + 1)
    heldout = [sample_scene(heldout_world, i) for i in range(config.heldout_scenes)]
    scorer = SceneScorer(model, config)
    scorer.report = {"heldout": scorer.accuracy(heldout), "train_seconds": time.perf_counter() - start}
    logger.info("scorer held-out accuracy: %s", scorer.report["heldout"])
    return scorer


def load_or_train_scorer(
    cache_dir: str | Path = DEFAULT_CACHE, config: ScorerConfig | None = None
) -> SceneScorer:
    """The scorer for `config`, from `cache_dir` when trained before (keyed by a hash of the config), else trained."""
    config = config or ScorerConfig()
    cache_dir = Path(cache_dir)
    weights, meta = (
        cache_dir / f"scorer-{config.key()}.safetensors",
        cache_dir / f"scorer-{config.key()}.json",
    )
    if weights.is_file() and meta.is_file():
        model = SceneClassifier(config.width, config.feature_dim)
        model.load_state_dict(load_file(weights), strict=True)
        return SceneScorer(model, config, json.loads(meta.read_text())["report"])
    scorer = train_scorer(config)
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in scorer.model.state_dict().items()}, weights)
    meta.write_text(
        json.dumps({"config": asdict(config), "report": scorer.report}, indent=2, default=list) + "\n"
    )
    return scorer


# ----------------------------------------------------------------------------------------------------------------------
# The two measures


def fidelity_scores(scorer: SceneScorer, images: ImageBatch, records: Sequence[SceneRecord]) -> np.ndarray:
    """Per image: the fraction of its caption's attributes the classifier confirms.

    Attributes: the background; each shape's type, colour and size at its position (colour and size count only
    where the slot is seen occupied); and one for "no extra shapes" (every other slot is seen empty).
    """
    pred = scorer.predict(images)
    if len(pred["background"]) != len(records):
        raise ValueError(f"got {len(pred['background'])} images for {len(records)} records")
    scores = []
    for i, record in enumerate(records):
        checks = [pred["background"][i] == COLOUR_NAMES.index(record.background)]
        used = set()
        for s in record.shapes:
            k = SLOTS.index(s.position)
            used.add(k)
            seen = pred["shape"][i, k] > 0
            checks += [
                pred["shape"][i, k] == SHAPE_CLASSES.index(s.shape),
                seen and pred["colour"][i, k] == COLOUR_NAMES.index(s.colour),
                seen and pred["size"][i, k] == SIZE_NAMES.index(s.size),
            ]
        checks.append(all(pred["shape"][i, k] == 0 for k in range(len(SLOTS)) if k not in used))
        scores.append(float(np.mean(checks)))
    return np.asarray(scores)


def caption_fidelity(
    images: ImageBatch, records: Sequence[SceneRecord], scorer: SceneScorer | None = None
) -> float:
    """Mean caption fidelity of `images` against their scene `records` (`fidelity_scores`); 1.0 is perfect."""
    return float(fidelity_scores(scorer or load_or_train_scorer(), images, records).mean())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussian fits of two (N, D) feature sets.

    Tr (S_a S_b)^(1/2) = sum of sqrt(eigenvalues of S_a^(1/2) S_b S_a^(1/2)), a symmetric PSD matrix, so two
    `eigh` calls replace scipy's `sqrtm` (float64; tiny negative eigenvalues from rounding are clipped to 0).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (N >= 2, D) feature sets of the same D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(w.clip(min=0))) @ v.T
    m = root_a @ s_b @ root_a
    trace_root = np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(min=0)).sum()
    d = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * trace_root
    return max(float(d), 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# The table


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _Teacher:
    """A diffusers-layout SD folder loaded with lcmkit's loaders; generates with guided DDIM (`sample_ddim`)."""

    def __init__(self, folder: Path, device: torch.device, spacing: str | None) -> None:
        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet").to(device).eval()
        self.vae = AutoencoderKL.from_pretrained(folder / "vae").to(device).eval()
        self.text_encoder = load_text_encoder(folder / "text_encoder").to(device)
        self.tokenizer = load_tokenizer(folder / "tokenizer")
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        self.scheduler = DDIMScheduler.from_config(
            config, **({"timestep_spacing": spacing} if spacing else {})
        )
        self.device = device

    def passes_per_step(self, g: float) -> int:
        return 2 if g != 1 else 1

    @torch.no_grad()
    def __call__(
        self, captions: list[str], x_T: torch.Tensor, steps: int, g: float, _seed: int
    ) -> torch.Tensor:
        cond = encode_prompt(captions, self.tokenizer, self.text_encoder, self.device)
        uncond = encode_prompt([""], self.tokenizer, self.text_encoder, self.device)
        z0 = sample_ddim(self.unet, self.scheduler, cond, uncond, g, steps, x_T.to(self.device))
        return self.vae.decode(z0 / self.vae.config.scaling_factor).sample.clamp(-1, 1).float().cpu()


class _LCM:
    """An LCM folder through `LatentConsistencyModelPipeline`, the way users run it."""

    def __init__(self, folder: Path, device: torch.device) -> None:
        self.pipe = LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.unet, self.device = self.pipe.unet, device

    def passes_per_step(self, g: float) -> int:
        """One with a w-embedding; two (classifier-free guidance) for a UNet without one, when g > 1."""
        return 2 if self.unet.config.time_cond_proj_dim is None and g > 1 else 1

    def __call__(
        self, captions: list[str], x_T: torch.Tensor, steps: int, g: float, seed: int
    ) -> torch.Tensor:
        generator = torch.Generator(self.device).manual_seed(seed)  # the noise the LCM adds between steps
        out = self.pipe(
            captions,
            num_inference_steps=steps,
            guidance_scale=g,
            latents=x_T.to(self.device),
            generator=generator,
            output_type="pt",
        )
        return out.images.float().cpu() * 2 - 1


def _generate(
    model: _Teacher | _LCM,
    captions: list[str],
    x_T: torch.Tensor,
    steps: int,
    g: float,
    seed: int,
    batch_size: int,
) -> tuple[torch.Tensor, float]:
    """All images of one row, batch by batch, and the seconds it took."""
    sync = torch.cuda.synchronize if model.device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    images = [
        model(captions[i : i + batch_size], x_T[i : i + batch_size], steps, g, seed + i)
        for i in range(0, len(captions), batch_size)
    ]
    sync()
    return torch.cat(images), time.perf_counter() - start


def evaluate_pipelines(
    teacher_folder: str | Path,
    lcm_folder: str | Path,
    n_images: int = 200,
    seed: int = 0,
    *,
    scorer: SceneScorer | None = None,
    scorer_cache: str | Path = DEFAULT_CACHE,
    guidance_scale: float = 7.5,
    teacher_steps: Sequence[int] = (50, 1, 2, 4, 8),
    lcm_steps: Sequence[int] = (1, 2, 4, 8),
    ddim_spacing: str | None = "trailing",
    world: WorldConfig | None = None,
    max_shapes: int = 2,
    batch_size: int = 50,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """The rows of the table: caption fidelity and FID of each (model, steps) on `n_images` held-out captions.

    Every row starts from the same x_T (seeded by `seed`) and is compared with the renders of the same records.
    Guidance: the teacher runs classifier-free guidance eps_u + g (eps_c - eps_u) with the empty prompt as the
    negative; the LCM gets the same g (its w-embedding holds w = g - 1, the paper's form of the same guidance).
    `ddim_spacing` overrides the teacher's timestep spacing: "trailing" starts every schedule at t = T - 1, as the
    LCM's does (with SD's "leading" + steps_offset 1, one DDIM step would start at t = 1, from pure noise);
    None keeps the teacher's config. Without `world`, captions come from held-out scenes of up to `max_shapes`
    shapes (match what the models were trained on). `reference` holds the real renders' fidelity (the scorer's ceiling) and
    `real_vs_real_fid`: the FID of renders of *other* scenes of the world, about what a sampler that draws perfect
    scenes but ignores its captions would get at this n (FID of the very same renders is 0).
    """
    if n_images < 2:
        raise ValueError(f"n_images must be at least 2 (FID fits a covariance), got {n_images}")
    device = torch.device(device) if device is not None else _default_device()
    scorer = (scorer or load_or_train_scorer(scorer_cache)).to(device)
    world = world or WorldConfig(image_size=scorer.image_size, seed=EVAL_WORLD_SEED, max_shapes=max_shapes)
    records = [sample_scene(world, i) for i in range(n_images)]
    others = [sample_scene(world, n_images + i) for i in range(n_images)]
    captions = [r.caption for r in records]
    real_features = scorer.features(render_batch(records))
    rows: list[dict[str, Any]] = []
    plan = (
        ("teacher DDIM", lambda: _Teacher(Path(teacher_folder), device, ddim_spacing), teacher_steps),
        ("LCM", lambda: _LCM(Path(lcm_folder), device), lcm_steps),
    )
    for name, load, step_counts in plan:
        model = load()
        config = model.unet.config
        x_T = torch.randn(
            (n_images, config.in_channels, config.sample_size, config.sample_size),
            generator=torch.Generator().manual_seed(seed),
        )
        for steps in step_counts:
            images, seconds = _generate(model, captions, x_T, steps, guidance_scale, seed, batch_size)
            rows.append(
                {
                    "model": name,
                    "steps": steps,
                    "guidance_scale": guidance_scale,
                    "caption_fidelity": caption_fidelity(images, records, scorer),
                    "fid": frechet_distance(scorer.features(images), real_features),
                    "attribute_accuracy": scorer.accuracy(records, images),
                    "unet_evals_per_image": steps * model.passes_per_step(guidance_scale),
                    "seconds": seconds,
                }
            )
            logger.info("%s", rows[-1])
        del model
    return {
        "n_images": n_images,
        "seed": seed,
        "guidance_scale": guidance_scale,
        "ddim_spacing": ddim_spacing or "teacher config",
        "world": asdict(world),
        "device": str(device),
        "rows": rows,
        "reference": {
            "real_caption_fidelity": caption_fidelity(render_batch(records), records, scorer),
            "real_vs_real_fid": frechet_distance(scorer.features(render_batch(others)), real_features),
        },
        "scorer": {"config_key": scorer.config.key(), **scorer.report},
    }


def _attribute_table(rows: list[dict[str, Any]]) -> list[str]:
    """Per-attribute accuracy of each row (which part of the caption a model misses; absent in old results)."""
    rows = [r for r in rows if "attribute_accuracy" in r]
    if not rows:
        return []
    names = list(rows[0]["attribute_accuracy"])
    lines = ["| model | steps | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for r in rows:
        acc = r["attribute_accuracy"]
        lines.append(f"| {r['model']} | {r['steps']} | " + " | ".join(f"{acc[k]:.3f}" for k in names) + " |")
    return lines


def markdown_table(results: dict[str, Any]) -> str:
    """Paper Table 1 in miniature: one row per model, FID and caption fidelity per step count, references below."""
    rows = results["rows"]
    steps = sorted({r["steps"] for r in rows})
    cells = {(r["model"], r["steps"]): r for r in rows}

    def value(model: str, k: int, key: str, fmt: str) -> str:
        return format(cells[model, k][key], fmt) if (model, k) in cells else "–"

    header = ["model", *(f"FID ↓ {k}" for k in steps), *(f"fidelity ↑ {k}" for k in steps)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in dict.fromkeys(r["model"] for r in rows):
        fids = [value(model, k, "fid", ".2f") for k in steps]
        fidelity = [value(model, k, "caption_fidelity", ".3f") for k in steps]
        lines.append("| " + " | ".join([model, *fids, *fidelity]) + " |")
    lines += ["", *_attribute_table(rows)]
    ref = results["reference"]
    lines += [
        "",
        f"n = {results['n_images']} captions, guidance scale {results['guidance_scale']}, seed {results['seed']}, "
        f"teacher DDIM spacing: {results['ddim_spacing']}. Column numbers are sampling steps.",
        f"Reference: real renders score fidelity {ref['real_caption_fidelity']:.3f}; renders of other scenes "
        f"score FID {ref['real_vs_real_fid']:.2f} (right scenes, wrong captions: the distribution alone).",
    ]
    heldout = results.get("scorer", {}).get("heldout")
    if heldout:
        lines.append(
            "Scorer on held-out real scenes: " + ", ".join(f"{k} {v:.4f}" for k, v in heldout.items())
        )
    return "\n".join(lines) + "\n"
