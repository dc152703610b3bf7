"""Train lcmkit's tiny real LCM from scratch: VAE -> teacher -> latent consistency distillation -> an LCM folder,
then its fast-mode decoder (a TAESD-layout tiny autoencoder distilled from the VAE; --tiny-vae-steps 0 skips it).

    .venv/bin/python scripts/train_tiny.py --out runs/tiny   # the shipped model's recipe (2 idle cores: about 105 min)
    .venv/bin/python scripts/train_tiny.py --out runs/tiny --ship src/lcmkit/assets/tiny-lcm --ship-tiny-vae src/lcmkit/assets/tiny-lcm-taesd --overwrite
    .venv/bin/python scripts/train_tiny.py --out runs/tiny --resume   # continue a stopped run
    .venv/bin/python scripts/train_tiny.py --out runs/tiny-quick --quick   # smoke run of every stage (CPU, minutes)
    accelerate launch --num_processes 8 scripts/train_tiny.py --out runs/tiny   # the same recipe on 8 GPUs

The result `OUT/lcm/` loads with `LatentConsistencyModelPipeline.from_pretrained`; `OUT/times.json` records the
seconds each stage took, `OUT/samples.png` shows 1/2/4-step samples, `OUT/work/*/` holds checkpoints and loss logs.
Batch sizes are per process; with N processes each step sees N times as many images.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

import torch

from lcmkit.train.loop import LR_SCHEDULES
from lcmkit.train.recipe import RecipeConfig, StagePlan, quick_config, run_recipe, ship, ship_tiny_vae


def _plan(args: argparse.Namespace, stage: str, base: StagePlan) -> StagePlan:
    """`base` with the stage's --<stage>-steps / -batch-size / -lr / -lr-schedule options that were given."""
    key = stage.replace("-", "_")
    given = {
        "steps": getattr(args, f"{key}_steps"),
        "batch_size": getattr(args, f"{key}_batch_size"),
        "learning_rate": getattr(args, f"{key}_lr"),
        "schedule": getattr(args, f"{key}_lr_schedule"),
    }
    return replace(base, **{k: v for k, v in given.items() if v is not None})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default=None, help="run folder (default runs/tiny, or runs/tiny-quick with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke run of every stage")
    parser.add_argument(
        "--resume", action="store_true", help="skip finished stages, continue from checkpoints"
    )
    parser.add_argument("--seed", type=int, default=0)
    for stage in ("vae", "teacher", "distill", "tiny-vae"):
        parser.add_argument(
            f"--{stage}-steps", type=int, default=None, help="0 skips" if stage == "tiny-vae" else None
        )
        parser.add_argument(f"--{stage}-batch-size", type=int, default=None, help="per process")
        parser.add_argument(f"--{stage}-lr", type=float, default=None)
        parser.add_argument(
            f"--{stage}-lr-schedule", choices=LR_SCHEDULES, default=None, help="decay after the warm-up"
        )
    parser.add_argument(
        "--text-pretrain-steps",
        type=int,
        default=None,
        help="next-token pretraining steps of the text encoder before the teacher (0: none)",
    )
    parser.add_argument(
        "--tiny-vae-sampler-pool",
        type=int,
        default=None,
        help="LCM latents drawn once for the tiny decoder to learn on (default 1024)",
    )
    parser.add_argument(
        "--noise-offset",
        type=float,
        default=None,
        help="offset noise of the teacher and distillation (default 0.2; 0: plain DDPM noise)",
    )
    parser.add_argument(
        "--w-min", type=float, default=None, help="paper-form guidance range (guidance_scale - 1)"
    )
    parser.add_argument("--w-max", type=float, default=None)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=None)
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None)
    parser.add_argument("--workers", type=int, default=None, help="data loader worker processes")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 with --quick, else torch's choice)",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--ship",
        default=None,
        help="after training, copy the LCM pipeline folder (without training extras) here, "
        "e.g. src/lcmkit/assets/tiny-lcm",
    )
    parser.add_argument(
        "--ship-tiny-vae",
        default=None,
        help="after training, copy the tiny autoencoder folder here, e.g. src/lcmkit/assets/tiny-lcm-taesd",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="let --ship / --ship-tiny-vae replace a folder"
    )
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> RecipeConfig:
    cfg = quick_config() if args.quick else RecipeConfig()
    overrides = {
        "out": args.out,
        "text_pretrain_steps": args.text_pretrain_steps,
        "noise_offset": args.noise_offset,
        "tiny_vae_sampler_pool": args.tiny_vae_sampler_pool,
        "w_min": args.w_min,
        "w_max": args.w_max,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "checkpoint_every": args.checkpoint_every,
        "mixed_precision": args.mixed_precision,
        "num_workers": args.workers,
    }
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    return replace(
        cfg,
        seed=args.seed,
        resume=args.resume,
        progress=not args.no_progress,
        vae=_plan(args, "vae", cfg.vae),
        teacher=_plan(args, "teacher", cfg.teacher),
        distill=_plan(args, "distill", cfg.distill),
        tiny_vae=None
        if args.tiny_vae_steps == 0 or cfg.tiny_vae is None
        else _plan(args, "tiny-vae", cfg.tiny_vae),
    )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    # The quick models are so small that one thread beats several (as in the test suite's conftest).
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    for option, dest in (("--ship", args.ship), ("--ship-tiny-vae", args.ship_tiny_vae)):
        if dest and Path(dest).exists() and not args.overwrite:
            raise SystemExit(f"train_tiny.py: error: {option} {dest} exists; add --overwrite to replace it")
    cfg = config_from_args(args)
    if args.ship_tiny_vae and cfg.tiny_vae is None:
        raise SystemExit(
            "train_tiny.py: error: --ship-tiny-vae needs the tiny-vae stage (not --tiny-vae-steps 0)"
        )
    times = run_recipe(cfg)
    if args.ship:
        ship(Path(cfg.out) / "lcm", args.ship, overwrite=args.overwrite)
    if args.ship_tiny_vae:
        ship_tiny_vae(Path(cfg.out) / "tiny-vae", args.ship_tiny_vae, overwrite=args.overwrite)
    if "samples" in times:  # the main process
        print(json.dumps(times, indent=2))


if __name__ == "__main__":
    main()
