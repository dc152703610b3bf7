"""Fast-mode image quality on a real model: each OpenVINO UNet precision against exact mode, image by image.

    .venv/bin/python benchmarks/fast_mode_quality.py                       # the shipped tiny model, 200 captions
    .venv/bin/python benchmarks/fast_mode_quality.py --model path/to/lcm --n 50 --precisions fp32 int8-weights
    .venv/bin/python benchmarks/fast_mode_quality.py --precisions --fast auto int8 --name fast_mode_quality_fast

For `--n` held-out captions of the synthetic world (the evaluation's, `lcmkit.train.eval`), every mode makes the
same images (same seeds, `--steps`, `--guidance`): exact mode (eager PyTorch), the OpenVINO UNet at each
precision, and with `--tiny-vae` (default: the shipped model's TAESD-layout decoder) each of those decoding with it. Reported per mode: PSNR against the exact-mode image (mean and worst image, pixels in [0, 1],
capped at 100 dB), caption fidelity by the evaluation's scene classifier, and its change against exact mode,
which the speed issue asks to stay within 2% with PSNR >= 30 dB. The int8 precisions that quantize activations are
calibrated on UNet inputs of *other* captions (`--calibration` of them), never the evaluated ones. `--fast P ...`
adds a row per `enable_fast(pipe, precision=P)` (the whole pipeline on OpenVINO, as `--fast` runs it; "auto" runs
the int8 trial where the CPU has int8 dot products, on its own prompts; its verdict is reported), each on a fresh
pipeline and a fresh cache. Caption fidelity
only means something for a model of the synthetic world (the shipped one); PSNR means something for any model.
Writes JSON to `benchmarks/results/<name>.json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lcmkit import LatentConsistencyModelPipeline
from lcmkit.accel.cpu import FAST_PRECISIONS
from lcmkit.accel.openvino import PRECISIONS, collect_unet_inputs, openvino_unet
from lcmkit.models.tiny_vae import AutoencoderTiny
from lcmkit.train.data import WorldConfig, sample_scene
from lcmkit.train.eval import EVAL_WORLD_SEED, caption_fidelity, load_or_train_scorer

RESULTS = Path(__file__).resolve().parent / "results"
SHIPPED = Path(__file__).resolve().parents[1] / "src" / "lcmkit" / "assets" / "tiny-lcm"
SHIPPED_TINY_VAE = SHIPPED.with_name("tiny-lcm-taesd")


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image PSNR (dB) of two (N, H, W, 3) batches in [0, 1], capped at 100 (identical or nearly so)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return np.minimum(100.0, 10 * np.log10(1.0 / np.maximum(mse, 1e-30)))


def generate(
    pipe: LatentConsistencyModelPipeline, captions: list[str], args: argparse.Namespace
) -> np.ndarray:
    images = []
    for i in range(0, len(captions), args.batch):
        generator = [
            torch.Generator().manual_seed(args.seed + i + k) for k in range(len(captions[i : i + args.batch]))
        ]
        out = pipe(
            captions[i : i + args.batch],
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=generator,
            output_type="np",
        )
        images.append(out.images)
    return np.concatenate(images)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    pipe = LatentConsistencyModelPipeline.from_pretrained(args.model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    world = WorldConfig(image_size=size, seed=EVAL_WORLD_SEED, max_shapes=args.max_shapes)
    records = [sample_scene(world, i) for i in range(args.n)]
    captions = [r.caption for r in records]
    calibration_captions = [sample_scene(world, args.n + i).caption for i in range(args.calibration)]
    scorer = load_or_train_scorer()

    def measure(name: str, images: np.ndarray, seconds: float, exact: np.ndarray | None) -> dict[str, Any]:
        pixels = (images * 255).round().astype(np.uint8)
        row: dict[str, Any] = {
            "mode": name,
            "caption_fidelity": caption_fidelity(pixels, records, scorer),
            "seconds": round(seconds, 2),
        }
        if exact is not None:
            p = psnr(images, exact)
            row.update(psnr_mean=float(p.mean()), psnr_min=float(p.min()))
        print(row, flush=True)
        return row

    eager_unet, exact_vae = pipe.unet, pipe.vae
    tiny_vae = AutoencoderTiny.from_pretrained(args.tiny_vae).eval() if args.tiny_vae else None
    start = time.perf_counter()
    exact = generate(pipe, captions, args)
    rows = [measure("exact (eager)", exact, time.perf_counter() - start, None)]
    variants: list[tuple[str, str | None, Any]] = [("tiny VAE decoder", None, tiny_vae)] if tiny_vae else []
    for precision in args.precisions:
        variants.append((f"openvino {precision}", precision, None))
        if tiny_vae:
            variants.append((f"openvino {precision} + tiny VAE decoder", precision, tiny_vae))
    calibration, compiled = None, {}
    for name, precision, vae in variants:
        if precision in ("int8", "int8-hybrid") and calibration is None:
            pipe.unet, pipe.vae = eager_unet, exact_vae  # record what exact mode feeds the UNet
            calibration = collect_unet_inputs(
                pipe, calibration_captions, num_inference_steps=args.steps, guidance_scale=args.guidance
            )
        if precision is not None and precision not in compiled:
            compiled[precision] = openvino_unet(
                eager_unet,
                batch_size=args.batch,
                precision=precision,
                calibration=calibration if precision in ("int8", "int8-hybrid") else None,
                threads=args.threads,
                text_tokens=pipe.tokenizer.model_max_length,
                vae_scale_factor=pipe.vae_scale_factor,
            )
        pipe.unet = compiled[precision] if precision else eager_unet
        pipe.vae = vae or exact_vae
        start = time.perf_counter()
        images = generate(pipe, captions, args)
        rows.append(measure(name, images, time.perf_counter() - start, exact))
    pipe.unet, pipe.vae = eager_unet, exact_vae
    for precision in args.fast:
        rows.append(fast_row(args, precision, captions, exact, measure))
    base = rows[0]["caption_fidelity"]
    for row in rows[1:]:
        row["fidelity_change"] = (row["caption_fidelity"] - base) / base if base else float("nan")
    return {
        "model": str(args.model),
        "n": args.n,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }


def fast_row(
    args: argparse.Namespace, precision: str, captions: list[str], exact: np.ndarray, measure: Any
) -> dict[str, Any]:
    """`enable_fast(precision=...)` on a fresh pipeline, compiled for `--batch`, in a fresh cache folder."""
    from lcmkit.accel import enable_fast

    pipe = LatentConsistencyModelPipeline.from_pretrained(args.model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory(prefix="lcmkit-quality-") as cache:
        mode = enable_fast(pipe, precision=precision, batch=args.batch, threads=args.threads, cache_dir=cache)
        print(f"# fast {precision}: {mode.describe()}", flush=True)
        start = time.perf_counter()
        images = generate(pipe, captions, args)
        row = measure(f"--fast-precision {precision}", images, time.perf_counter() - start, exact)
    row["fast_mode"] = mode.describe()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=SHIPPED)
    parser.add_argument("--n", type=int, default=200, help="evaluated captions")
    parser.add_argument("--calibration", type=int, default=32, help="other captions to calibrate int8 on")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=8.5)
    parser.add_argument("--max-shapes", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8, help="images per pipeline call (and compiled batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", nargs="*", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument(
        "--fast",
        nargs="*",
        default=[],
        choices=FAST_PRECISIONS,
        help="also measure enable_fast at these precisions (the whole pipeline on OpenVINO)",
    )
    parser.add_argument(
        "--tiny-vae",
        type=Path,
        default=SHIPPED_TINY_VAE if SHIPPED_TINY_VAE.is_dir() else None,
        help="an AutoencoderTiny folder: adds rows that decode with it (default: the shipped model's, if present)",
    )
    parser.add_argument("--name", default="fast_mode_quality_tiny")
    args = parser.parse_args()
    if args.n % args.batch:
        parser.error(
            f"--n ({args.n}) must be a multiple of --batch ({args.batch}): the graph has a fixed batch"
        )
    result = run(args)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{args.name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| mode | caption fidelity | change | PSNR mean (dB) | PSNR worst (dB) | seconds |")
    print("|---|---|---|---|---|---|")
    for row in result["rows"]:
        change = f"{row['fidelity_change']:+.1%}" if "fidelity_change" in row else ""
        mean = f"{row['psnr_mean']:.1f}" if "psnr_mean" in row else ""
        worst = f"{row['psnr_min']:.1f}" if "psnr_min" in row else ""
        print(
            f"| {row['mode']} | {row['caption_fidelity']:.3f} | {change} | {mean} | {worst} | {row['seconds']} |"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
