"""Train lcmkit's tiny real LCM from scratch: VAE -> teacher -> latent consistency distillation -> an LCM folder.

    .venv/bin/python scripts/train_tiny.py --out runs/tiny   # the shipped model's recipe (2 idle cores: ~75 min)
    .venv/bin/python scripts/train_tiny.py --out runs/tiny --ship src/lcmkit/assets/tiny-lcm --overwrite
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

from lcmkit.train.recipe import RecipeConfig, StagePlan, quick_config, run_recipe, ship


def _plan(base: StagePlan, steps: int | None, batch: int | None, lr: float | None) -> StagePlan:
    return replace(
        base,
        steps=steps if steps is not None else base.steps,
        batch_size=batch if batch is not None else base.batch_size,
        learning_rate=lr if lr is not None else base.learning_rate,
    )


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
    for stage in ("vae", "teacher", "distill"):
        parser.add_argument(f"--{stage}-steps", type=int, default=None)
        parser.add_argument(f"--{stage}-batch-size", type=int, default=None, help="per process")
        parser.add_argument(f"--{stage}-lr", type=float, default=None)
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
    parser.add_argument("--overwrite", action="store_true", help="let --ship replace an existing folder")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> RecipeConfig:
    cfg = quick_config() if args.quick else RecipeConfig()
    overrides = {
        "out": args.out,
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
        vae=_plan(cfg.vae, args.vae_steps, args.vae_batch_size, args.vae_lr),
        teacher=_plan(cfg.teacher, args.teacher_steps, args.teacher_batch_size, args.teacher_lr),
        distill=_plan(cfg.distill, args.distill_steps, args.distill_batch_size, args.distill_lr),
    )


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    # The quick models are so small that one thread beats several (as in the test suite's conftest).
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    if args.ship and Path(args.ship).exists() and not args.overwrite:
        parser_error = f"--ship {args.ship} exists; add --overwrite to replace it"
        raise SystemExit(f"train_tiny.py: error: {parser_error}")
    cfg = config_from_args(args)
    times = run_recipe(cfg)
    if args.ship:
        ship(Path(cfg.out) / "lcm", args.ship, overwrite=args.overwrite)
    if "samples" in times:  # the main process
        print(json.dumps(times, indent=2))


if __name__ == "__main__":
    main()
