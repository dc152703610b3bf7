"""`python -m lcmkit`: generate images from an LCM folder, or run the offline demo.

Kept thin: it parses arguments and calls the pipeline. The full CLI (batches, LoRA, server) builds on this.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size must look like 512x512 (WIDTHxHEIGHT), got {text!r}"
        ) from None
    return w, h


def free_path(folder: Path, stem: str, suffix: str = ".png") -> Path:
    """The first `stem-NNNN.png` in `folder` that does not exist yet: never overwrite a user's file."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    while (path := folder / f"{stem}-{n:04d}{suffix}").exists():
        n += 1
    return path


def _generate(model: Path, prompt: str, args: argparse.Namespace) -> list[Path]:
    import torch

    from lcmkit import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(model)
    kwargs = {}
    if args.size:
        kwargs["width"], kwargs["height"] = args.size
    images = pipe(
        prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        num_images_per_prompt=args.n,
        generator=torch.Generator().manual_seed(args.seed),
        **kwargs,
    ).images
    paths = []
    for image in images:
        path = free_path(Path(args.out), "lcm")
        image.save(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lcmkit", description="Latent Consistency Model image generation")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="text-to-image from a diffusers-layout LCM folder")
    gen.add_argument("prompt")
    gen.add_argument("--model", required=True, type=Path, help="a diffusers-layout LCM folder")
    demo = sub.add_parser(
        "demo", help="build a tiny random LCM folder offline and generate from it (noise image)"
    )
    for p in (gen, demo):
        p.add_argument("--steps", type=int, default=4)
        p.add_argument("--guidance", type=float, default=8.5)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT, multiples of 8")
        p.add_argument("-n", type=int, default=1, help="images per prompt")
        p.add_argument("--out", default="out", help="output folder (existing files are never overwritten)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "demo":
            from lcmkit.tiny import build_tiny_lcm

            model = Path(args.out) / "tiny-lcm"
            if not (model / "model_index.json").exists():
                build_tiny_lcm(model)
            paths = _generate(model, "a red circle on a blue background", args)
        else:
            paths = _generate(args.model, args.prompt, args)
    except (ValueError, OSError, TypeError) as e:
        print(f"lcmkit: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
