"""The command-line side of lcmkit.distributed: `lcmkit batch` and `lcmkit serve --ray --replicas N`.

`lcmkit.cli` only registers these; Ray is imported when a command runs, so a missing Ray is one error line.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lcmkit.distributed.batch import FORMATS, MANIFEST_FORMATS


def add_batch_parser(sub: Any, parents: list[argparse.ArgumentParser], formatter: type, arg: Any) -> None:
    """`lcmkit batch ROWS --out DIR --workers N`; `arg` is lcmkit.cli's argparse type maker."""
    from lcmkit.request import parse_float, parse_int, parse_seed, parse_size

    p = sub.add_parser("batch", parents=parents, formatter_class=formatter,
                       help="many prompts on Ray Data (needs lcmkit[ray])",
                       description="One image per row of a JSONL, CSV or Parquet file, on a pool of Ray actors "
                       "(one pipeline each). Columns: prompt (or --prompt-column) and optionally id, seed, steps, "
                       "guidance, size or width/height, negative_prompt, strength, image. A row's image is "
                       "OUT/<id or row number>.png, the same as `lcmkit generate` with its seed; a rerun skips "
                       "images that exist; bad rows are listed in the manifest with their error.")  # fmt: skip
    add = p.add_argument
    add("rows", metavar="ROWS", help=f"the rows: {', '.join(sorted(FORMATS))}")
    add("--out", required=True, help="output folder for the PNGs and the manifest; existing images are kept")
    add("--workers", type=arg(parse_int, "--workers", 1), default=1, help="Ray actors, one pipeline each")
    add("--seed", type=arg(parse_seed), default=0, help="a row without a seed uses seed + its row number")
    add("--steps", type=arg(parse_int, "--steps", 1), default=4, help="denoising steps")
    add("--guidance", type=arg(parse_float, "--guidance"), default=8.5, help="guidance scale")
    add("--size", type=arg(parse_size), metavar="WxH", help="multiples of 8; default: the model's")
    add("--negative", default="", help="negative prompt (only for pipelines that take one)")
    add("--strength", type=arg(parse_float, "--strength", 0.0, 1.0), default=0.8, help="img2img strength")
    add(
        "--threads",
        type=arg(parse_int, "--threads", 1),
        default=None,
        help="CPU threads per actor (default: the cluster's CPUs // --workers)",
    )
    add("--prompt-column", default="prompt", help="the column holding the prompts")
    add("--manifest", choices=MANIFEST_FORMATS, default="parquet", help="manifest format")
    add("--address", default=None, help="a Ray cluster to join (default: $RAY_ADDRESS, else a local one)")
    add("--quiet", action="store_true", help="no progress bar")


def add_serve_arguments(p: argparse.ArgumentParser, arg: Any) -> None:
    from lcmkit.request import parse_int

    p.add_argument("--ray", action="store_true", help="serve on Ray Serve (needs lcmkit[ray])")
    p.add_argument("--replicas", type=arg(parse_int, "--replicas", 1), default=1,
                   help="with --ray: model replicas, one pipeline each")  # fmt: skip
    p.add_argument(
        "--address", default=None, help="with --ray: a Ray cluster to join (default: $RAY_ADDRESS)"
    )


def cmd_batch(args: argparse.Namespace, spec: Any) -> int:
    from lcmkit.distributed.batch import generate_dataset

    summary = generate_dataset(args.rows, args.out, spec, args.workers, seed=args.seed, steps=args.steps,
                               guidance=args.guidance, size=args.size, negative_prompt=args.negative,
                               strength=args.strength, prompt_column=args.prompt_column,
                               manifest=args.manifest, threads=args.threads, progress=not args.quiet, address=args.address)  # fmt: skip
    for record in summary.records:
        if record["status"] == "error":
            print(f"lcmkit: error: row {record['index']}: {record['error']}", file=sys.stderr)
    print(summary.line(), file=sys.stderr)
    return 1 if summary.failed else 0


def cmd_serve_ray(args: argparse.Namespace, spec: Any, options: dict[str, Any], api_key: str | None) -> int:
    from lcmkit.distributed.serve import run_serve

    run_serve(spec, host=args.host, port=args.port, api_key=api_key, replicas=args.replicas,
              address=args.address, **options)  # fmt: skip
    return 0
