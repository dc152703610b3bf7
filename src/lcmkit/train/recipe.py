"""The whole tiny-LCM recipe: VAE -> teacher -> latent consistency distillation -> an LCM folder, timed per stage,
then the fast-mode decoder (a TAESD-layout autoencoder distilled from the VAE).

`scripts/train_tiny.py` is its command line. Layout under `out/`:

    vae/  teacher/  lcm/  tiny-vae/           the results (VAE, teacher, LCM pipeline and AutoencoderTiny folders)
    work/{vae,teacher,distill,tiny-vae}/      checkpoints, loss CSV + PNG, configs of each stage
    times.json                   seconds per stage, steps, device, world size
    samples.png                  LCM samples (1, 2, 4 steps) for a few captions

With `resume=True` a finished stage (its result folder exists) is skipped and an unfinished one continues from
its newest checkpoint, so a killed run restarts with the same command.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from lcmkit.pipelines.text2img import LatentConsistencyModelPipeline
from lcmkit.train.data import SyntheticShapes, WorldConfig
from lcmkit.train.distill import DistillConfig, distill
from lcmkit.train.loop import LoopConfig, make_accelerator
from lcmkit.train.teacher import (
    ARCHITECTURES,
    Architecture,
    TeacherTrainConfig,
    VAETrainConfig,
    train_teacher,
    train_vae,
)
from lcmkit.train.text_pretrain import TextPretrainConfig
from lcmkit.train.tiny_autoencoder import TinyAutoencoderTrainConfig, train_tiny_autoencoder

logger = logging.getLogger(__name__)


@dataclass
class StagePlan:
    """Steps, per-process batch size, learning rate, warm-up and decay (`LoopConfig.lr_schedule`,
    `lr_decay_steps`) of one stage."""

    steps: int
    batch_size: int
    learning_rate: float
    warmup: int = 0
    schedule: str = "constant"
    # The last steps over which `schedule` falls to 0 (None: all after the warm-up); a stage cut shorter than
    # this (e.g. `--teacher-steps 300`) decays over all of its steps.
    decay_steps: int | None = None


@dataclass
class RecipeConfig:
    """The defaults are the recipe of the shipped model (`src/lcmkit/assets/tiny-lcm`), sized for 2 CPU cores."""

    out: str | Path = "runs/tiny"
    architecture: str | Architecture = "cpu"  # a name in ARCHITECTURES, or an Architecture
    seed: int = 0
    vae: StagePlan = field(default_factory=lambda: StagePlan(2_000, 16, 1e-3, 50))
    # Constant rate, then a linear decay to 0 over the last 600 steps: without the decay the teacher painted a
    # red shape orange (shape colour 0.61 right; 0.80 after the decay, in a pilot continued from step 4,000).
    teacher: StagePlan = field(default_factory=lambda: StagePlan(4_600, 32, 5e-4, 200, "linear", 600))
    distill: StagePlan = field(default_factory=lambda: StagePlan(800, 32, 1e-4, 50, "linear", 200))
    # The fast-mode decoder: a TAESD-layout autoencoder distilled from the VAE (train/tiny_autoencoder.py); None skips.
    # 800 constant-rate steps left its loss still falling (27.7 dB against exact-mode images, caption fidelity -5.7%);
    # 1,600 with the last 600 decaying reached 31.8 dB and -2.3%; this is for the fast-mode bar (30 dB, within 2%).
    tiny_vae: StagePlan | None = field(
        default_factory=lambda: StagePlan(2_400, 16, 1e-3, 50, "linear", 1_200)
    )
    tiny_vae_channels: int = 32
    # LCM latents (from `lcm/`) drawn once for the tiny decoder to learn on beside the encoder's; see
    # train/tiny_autoencoder.py for why.
    tiny_vae_sampler_pool: int = 1024
    # Next-token pretraining of the text encoder before the teacher's diffusion loss (train/text_pretrain.py).
    # Off in the shipped recipe: in our one CPU run with 300 steps the teacher's text conditioning had not taken
    # hold by step 4,000 (caption fidelity 0.30 against 0.66 without it), so it stays an experiment.
    text_pretrain_steps: int = 0
    # Offset noise (teacher.draw_noise) in the teacher's and the distillation's forward process. Without it the
    # shipped teacher painted the background the colour of x_T's mean, not the caption's (diagnosed on the
    # previous shipped model: the same x_T gave the same background for every caption).
    noise_offset: float = 0.2
    # Scenes of one shape: what a 3.5M-parameter UNet learns in a CPU hour (the world can draw more).
    max_shapes: int = 1
    # Captions leave out size / position words this often, so "a red circle on a blue background" works.
    caption_omit: float = 0.25
    # Paper-form guidance range; the pipeline's guidance_scale is w + 1, so this covers guidance_scale 2..9
    # (the CLI's default is 8.5).
    w_min: float = 1.0
    w_max: float = 8.0
    num_ddim_timesteps: int = 50
    checkpoint_every: int = 500
    log_every: int = 10
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    num_workers: int = 1  # scenes are cheap to draw; one worker overlaps it with the step
    resume: bool = False
    progress: bool = True
    sample_captions: tuple[str, ...] = (
        "a large red circle at the top left on a blue background",
        "a small yellow square in the center on a black background",
        "a large green triangle at the bottom right on a purple background",
        "a red circle on a blue background",
    )


def quick_config(out: str | Path = "runs/tiny-quick") -> RecipeConfig:
    """A smoke run of every stage on the "quick" architecture (minutes on a CPU); its images are not meaningful."""
    return RecipeConfig(
        out=out,
        architecture="quick",
        vae=StagePlan(30, 8, 1e-3),
        teacher=StagePlan(30, 8, 1e-3),
        distill=StagePlan(10, 4, 1e-4),
        tiny_vae=StagePlan(10, 4, 1e-3),
        tiny_vae_channels=8,
        tiny_vae_sampler_pool=8,
        text_pretrain_steps=10,
        checkpoint_every=10,
        log_every=1,
        num_workers=0,
    )


def _loop(cfg: RecipeConfig, stage: str, plan: StagePlan) -> LoopConfig:
    return LoopConfig(
        output_dir=Path(cfg.out) / "work" / stage,
        max_steps=plan.steps,
        batch_size=plan.batch_size,
        learning_rate=plan.learning_rate,
        lr_warmup_steps=plan.warmup,
        lr_schedule=plan.schedule,
        lr_decay_steps=None if plan.decay_steps is None else min(plan.decay_steps, plan.steps),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        checkpoint_every=cfg.checkpoint_every,
        log_every=cfg.log_every,
        seed=cfg.seed,
        resume=cfg.resume,
        num_workers=cfg.num_workers,
        progress=cfg.progress,
    )


def _stage_configs(
    cfg: RecipeConfig,
) -> tuple[VAETrainConfig, TeacherTrainConfig, DistillConfig, TinyAutoencoderTrainConfig | None]:
    arch = ARCHITECTURES[cfg.architecture] if isinstance(cfg.architecture, str) else cfg.architecture
    out = Path(cfg.out)
    world = WorldConfig(
        image_size=arch.image_size,
        seed=cfg.seed,
        max_shapes=cfg.max_shapes,
        caption_omit=cfg.caption_omit,
    )
    vae = VAETrainConfig(
        save_dir=out / "vae",
        vae=arch.vae,
        image_size=arch.image_size,
        world=world,
        mixed_precision=cfg.mixed_precision,
        loop=_loop(cfg, "vae", cfg.vae),
    )
    teacher = TeacherTrainConfig(
        vae_dir=out / "vae",
        save_dir=out / "teacher",
        unet=arch.unet,
        text=arch.text,
        image_size=arch.image_size,
        world=world,
        text_pretrain=TextPretrainConfig(steps=cfg.text_pretrain_steps, seed=cfg.seed),
        noise_offset=cfg.noise_offset,
        mixed_precision=cfg.mixed_precision,
        loop=_loop(cfg, "teacher", cfg.teacher),
    )
    student = DistillConfig(
        teacher=out / "teacher",
        save_dir=out / "lcm",
        world=world,
        num_ddim_timesteps=cfg.num_ddim_timesteps,
        w_min=cfg.w_min,
        w_max=cfg.w_max,
        noise_offset=cfg.noise_offset,
        mixed_precision=cfg.mixed_precision,
        loop=_loop(cfg, "distill", cfg.distill),
    )
    tiny = None
    if cfg.tiny_vae is not None:
        tiny = TinyAutoencoderTrainConfig(
            vae_dir=out / "vae",
            save_dir=out / "tiny-vae",
            image_size=arch.image_size,
            world=world,
            channels=cfg.tiny_vae_channels,
            sampler_dir=out / "lcm",
            sampler_pool=cfg.tiny_vae_sampler_pool,
            mixed_precision=cfg.mixed_precision,
            loop=_loop(cfg, "tiny-vae", cfg.tiny_vae),
        )
    return vae, teacher, student, tiny


def sample_grid(lcm_dir: str | Path, captions: tuple[str, ...], path: str | Path, seed: int = 0) -> Path:
    """One row per caption: 1-, 2- and 4-step LCM samples, then a real image of a world scene for scale."""
    pipe = LatentConsistencyModelPipeline.from_pretrained(lcm_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    rows = []
    for caption in captions:
        row = []
        for steps in (1, 2, 4):
            generator = torch.Generator().manual_seed(seed)
            out = pipe(
                caption, num_inference_steps=steps, guidance_scale=4.0, generator=generator, output_type="np"
            )
            row.append((out.images[0] * 255).round().astype(np.uint8))
        rows.append(np.concatenate(row, axis=1))
    example = SyntheticShapes(WorldConfig(image_size=size, seed=seed))[0][0]
    reference = ((example.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    grid = np.concatenate(rows, axis=0)
    canvas = np.zeros((grid.shape[0], grid.shape[1] + size, 3), np.uint8)
    canvas[:, : grid.shape[1]] = grid
    canvas[:size, grid.shape[1] :] = reference
    Image.fromarray(canvas).save(path)
    return Path(path)


def ship(lcm_dir: str | Path, dest: str | Path, overwrite: bool = False) -> Path:
    """Copy what a pipeline loads from an LCM folder (model_index.json and the components it names) to `dest`.

    Training extras (`unet_target/`) stay behind. An existing `dest` is replaced only with `overwrite=True`.
    """
    src, dest = Path(lcm_dir), Path(dest)
    index_file = src / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{src} is not a pipeline folder (no model_index.json)")
    if dest.exists() and not overwrite:
        raise ValueError(f"{dest} exists; pass overwrite=True (--overwrite) to replace it")
    index = json.loads(index_file.read_text())
    parts = [name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)]

    def fill(staging: Path) -> None:
        shutil.copy2(index_file, staging / index_file.name)
        for name in parts:
            if index[name][0] is not None and (src / name).is_dir():
                shutil.copytree(src / name, staging / name)

    return _replace_folder(dest, fill)


def ship_tiny_vae(tiny_vae_dir: str | Path, dest: str | Path, overwrite: bool = False) -> Path:
    """Copy an `AutoencoderTiny` folder (the recipe's `tiny-vae/`) to `dest`; replaces `dest` only with `overwrite`."""
    src, dest = Path(tiny_vae_dir), Path(dest)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} is not a model folder (no config.json); train it with --tiny-vae-steps")
    if dest.exists() and not overwrite:
        raise ValueError(f"{dest} exists; pass overwrite=True (--overwrite) to replace it")
    return _replace_folder(dest, lambda staging: shutil.copytree(src, staging, dirs_exist_ok=True))


def _replace_folder(dest: Path, fill: Callable[[Path], object]) -> Path:
    """Build the new folder beside `dest` (`fill(staging)`), then swap it in: a failed copy leaves `dest` alone."""
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    fill(staging)
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    return dest


def _run_stage(
    name: str, done: Path, cfg: RecipeConfig, plan: StagePlan, times: dict, run: Callable[[], object]
) -> None:
    """Run (or, on resume, skip) one stage and record its time; a skipped stage keeps its earlier record."""
    if cfg.resume and done.exists():
        logger.info("stage %s already finished (%s exists); skipping", name, done)
        times[name] = {**times.get(name, {}), "skipped": True}
        return
    start = time.perf_counter()
    run()
    seconds = round(time.perf_counter() - start, 3)
    times[name] = {
        "seconds": seconds,
        "skipped": False,
        "steps": plan.steps,
        "batch_size_per_process": plan.batch_size,
    }
    logger.info("stage %s took %.1f s", name, seconds)


def _write_times(accelerator: Accelerator, path: Path, times: dict) -> None:
    if accelerator.is_main_process:
        path.write_text(json.dumps(times, indent=2) + "\n")


def run_recipe(cfg: RecipeConfig, accelerator: Accelerator | None = None) -> dict:
    """Run the stages (skipping finished ones on resume); return the timing record, written after each stage.

    A stage's `seconds` are those of the invocation that finished it (time before a resume is not counted).
    """
    if isinstance(cfg.architecture, str) and cfg.architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {cfg.architecture!r}; known: {sorted(ARCHITECTURES)}")
    accelerator = accelerator or make_accelerator(cfg.gradient_accumulation_steps, cfg.mixed_precision)
    out = Path(cfg.out)
    times_file = out / "times.json"
    times: dict = json.loads(times_file.read_text()) if cfg.resume and times_file.is_file() else {}
    times.update(
        architecture=cfg.architecture if isinstance(cfg.architecture, str) else "custom",
        device=str(accelerator.device),
        num_processes=accelerator.num_processes,
        mixed_precision=cfg.mixed_precision,
        torch=torch.__version__,
    )
    vae_cfg, teacher_cfg, distill_cfg, tiny_cfg = _stage_configs(cfg)
    stages = (
        ("vae", out / "vae" / "config.json", cfg.vae, lambda: train_vae(vae_cfg, accelerator)),
        (
            "teacher",
            out / "teacher" / "model_index.json",
            cfg.teacher,
            lambda: train_teacher(teacher_cfg, accelerator),
        ),
        ("distill", out / "lcm" / "model_index.json", cfg.distill, lambda: distill(distill_cfg, accelerator)),
    )
    if tiny_cfg is not None:
        tiny = (
            "tiny-vae",
            out / "tiny-vae" / "config.json",
            cfg.tiny_vae,
            lambda: train_tiny_autoencoder(tiny_cfg, accelerator),
        )
        stages = (*stages, tiny)
    start = time.perf_counter()
    for name, done, plan, run in stages:
        _run_stage(name, done, cfg, plan, times, run)
        _write_times(accelerator, times_file, times)
    if accelerator.is_main_process:
        samples_start = time.perf_counter()
        sample_grid(out / "lcm", cfg.sample_captions, out / "samples.png", cfg.seed)
        times["samples"] = {"seconds": round(time.perf_counter() - samples_start, 3)}
        times["total_seconds_this_invocation"] = round(time.perf_counter() - start, 3)
        _write_times(accelerator, times_file, times)
    accelerator.wait_for_everyone()
    return times
