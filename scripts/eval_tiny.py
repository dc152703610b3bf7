"""Evaluate a tiny teacher and its LCM: the LCM paper's Table 1 in miniature, on the synthetic shapes world.

    .venv/bin/python scripts/eval_tiny.py --teacher runs/tiny/teacher --lcm runs/tiny/lcm --n 200 \\
        --out benchmarks/results/eval_tiny.json

Rows: the teacher with guided DDIM (50 steps as the reference, then 1/2/4/8) and the LCM at 1/2/4/8 steps, all
from the same noise and captions. Columns: FID on the scene classifier's features (lower is better) and caption
fidelity (the fraction of each caption's attributes the classifier confirms; higher is better). The classifier
is trained once (about a minute on 2 CPU cores) and cached in --scorer-cache. Writes the JSON to --out and the
markdown table next to it (.md), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from lcmkit.train.eval import DEFAULT_CACHE, evaluate_pipelines, markdown_table


def _steps(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"steps must be comma-separated integers, got {text!r}") from None
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"steps must be positive integers, got {text!r}")
    return steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", required=True, type=Path, help="teacher folder (diffusers SD layout)")
    parser.add_argument("--lcm", required=True, type=Path, help="LCM pipeline folder")
    parser.add_argument("--n", type=int, default=200, help="captions (images per row)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    parser.add_argument("--guidance", type=float, default=7.5, help="guidance scale g for both models")
    parser.add_argument("--teacher-steps", type=_steps, default=(50, 1, 2, 4, 8))
    parser.add_argument("--lcm-steps", type=_steps, default=(1, 2, 4, 8))
    parser.add_argument(
        "--ddim-spacing",
        choices=("trailing", "leading", "linspace", "teacher"),
        default="trailing",
        help="timestep spacing of the teacher's DDIM ('teacher': as its scheduler config says)",
    )
    parser.add_argument(
        "--max-shapes",
        type=int,
        default=1,
        help="shapes per held-out scene, as the models were trained (the shipped model: 1)",
    )
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--scorer-cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/eval_tiny.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = evaluate_pipelines(
        args.teacher,
        args.lcm,
        n_images=args.n,
        seed=args.seed,
        scorer_cache=args.scorer_cache,
        guidance_scale=args.guidance,
        teacher_steps=args.teacher_steps,
        lcm_steps=args.lcm_steps,
        ddim_spacing=None if args.ddim_spacing == "teacher" else args.ddim_spacing,
        max_shapes=args.max_shapes,
        batch_size=args.batch_size,
        device=args.device,
    )
    results["teacher_folder"], results["lcm_folder"] = str(args.teacher), str(args.lcm)
    table = markdown_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
