"""diffusers against lcmkit's all-OpenVINO fp32 mode (UNet and VAE decoder), interleaved run by run, on the CPU.

    .venv/bin/python benchmarks/bench_openvino_exact.py --size 512 --reps 3 --threads 2

`bench_vs_diffusers.py --openvino fp32` times this mode after the side-by-side eager runs, so a machine whose speed
drifts during the run (a shared VM) skews its ratio. Here the two alternate (diffusers, OpenVINO, OpenVINO,
diffusers, ...) after one warm-up each, on the same SD1.5-size random-weight folder (`--model-dir`, built by
`bench_vs_diffusers.py` when missing) and the same prompt and seed; the converted graphs come from the same cache
(`<model-dir>-openvino`). Reports the median end-to-end time of each, the ratio, every run, and the max abs
difference between the images (pixels in [0, 1]). Writes `benchmarks/results/<name>.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_diffusers import RESULTS, compare_size, ensure_model, load, machine_info  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/lcmkit-bench-sd15"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (OpenVINO picks its own)")
    parser.add_argument("--name", default="openvino_exact_interleaved")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.size % 8:
        parser.error("--reps must be >= 1 and --size a multiple of 8")
    if args.threads:
        torch.set_num_threads(args.threads)
    from lcmkit.accel import openvino_unet, use_openvino_vae_decoder

    ensure_model(args.model_dir)
    cache = args.model_dir.with_name(args.model_dir.name + "-openvino")
    ref, _ = load("diffusers", args.model_dir)
    ours, _ = load("lcmkit", args.model_dir)
    t0 = time.perf_counter()
    ours.unet = openvino_unet(ours.unet, height=args.size, width=args.size, precision="fp32", cache_dir=cache)
    use_openvino_vae_decoder(ours, "fp32", cache_dir=cache)
    prepare_s = time.perf_counter() - t0
    # compare_size warms each up, alternates them run by run and diffs "lcmkit" (here the OpenVINO one) against diffusers
    result, _ = compare_size({"diffusers": ref, "lcmkit": ours}, args.size, args.reps)
    runs = {"diffusers": result["runs"]["diffusers"], "openvino fp32": result["runs"]["lcmkit"]}
    summary = result["summary"]
    median = {
        "diffusers": summary["diffusers"]["end_to_end_s"],
        "openvino fp32": summary["lcmkit"]["end_to_end_s"],
    }
    diff = result["max_abs_image_diff"]
    report = {
        "command": " ".join(["benchmarks/bench_openvino_exact.py", *(argv or sys.argv[1:])]),
        "machine": machine_info(),
        "size": args.size,
        "reps": args.reps,
        "median_end_to_end_s": median,
        "speedup_diffusers_over_openvino_fp32": median["diffusers"] / median["openvino fp32"],
        "max_abs_image_diff": diff,
        "prepare_s": prepare_s,
        "runs": runs,
    }
    out = RESULTS / f"{args.name}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.size}²: diffusers {median['diffusers']:.2f} s, OpenVINO fp32 UNet + VAE decoder "
          f"{median['openvino fp32']:.2f} s: {report['speedup_diffusers_over_openvino_fp32']:.2f}x; "
          f"max abs image difference {diff:.2g}; one-time preparation {prepare_s:.0f} s (cache reads count)")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
