"""Eager PyTorch UNet against the OpenVINO fast mode (fp32, int8 weights, int8 hybrid, full int8), in one process.

    .venv/bin/python benchmarks/bench_openvino_unet.py --threads 1                  # half-width SD1.5 UNet, 32² latent
    .venv/bin/python benchmarks/bench_openvino_unet.py --threads 2 --preset sd15    # SD1.5 size (3.4 GB of weights)
    .venv/bin/python benchmarks/bench_openvino_unet.py --model /path/to/unet        # a saved diffusers UNet folder

The UNet has the SD1.5 layout with an LCM w-embedding (`time_cond_proj_dim=256`, cross-attention 768); `half` halves
every width (about 220M parameters) and keeps the head width. Weights are random (seeded) unless `--model` is given.

Calibration and evaluation inputs are real UNet inputs of an LCM sampler: `--trajectories` runs of the LCM scheduler
(`--steps` steps, random text embeddings and w-embedding) with the eager UNet record (x_t, t, c, w) at every step;
the last run is held out for evaluation. Quality columns are against eager on the held-out inputs: max abs diff and
relative RMS error of one UNet call, and the same for the final LCM estimate x0 after the whole sampler runs with
that UNet. Random weights say little about image quality; on real weights the x0 column is the one to watch.

Timing: each variant is warmed up once, then `--repeats` rounds alternate the variants; the median and the minimum,
each with its ratio to eager, are reported (on a busy machine the minimum is the steadier of the two). Prints a
table and writes JSON to `benchmarks/results/<name>.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lcmkit.accel.openvino import PRECISIONS, UNetInputs, openvino_unet
from lcmkit.config import UNetConfig
from lcmkit.models.unet import UNet2DConditionModel
from lcmkit.schedulers.lcm import LCMScheduler
from lcmkit.schedulers.lcm_math import guidance_scale_embedding

RESULTS = Path(__file__).resolve().parent / "results"
SD15 = UNetConfig(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    attention_head_dim=(8, 8, 8, 8),
    cross_attention_dim=768,
    time_cond_proj_dim=256,
)
# Half of every width; 4 heads keep SD1.5's head width (40/80/160), which is what the attention kernels see.
HALF = replace(SD15, block_out_channels=(160, 320, 640, 640), attention_head_dim=(4, 4, 4, 4))
PRESETS = {"sd15": SD15, "half": HALF}
GUIDANCE = 8.0
TEXT_TOKENS = 77


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_unet(args: argparse.Namespace) -> UNet2DConditionModel:
    if args.model:
        return UNet2DConditionModel.from_pretrained(args.model).eval()
    torch.manual_seed(args.seed)
    return UNet2DConditionModel(PRESETS[args.preset]).eval()


def lcm_sample(
    unet: Callable,
    x_t: torch.Tensor,
    context: torch.Tensor,
    w_emb: torch.Tensor | None,
    steps: int,
    seed: int,
) -> tuple[torch.Tensor, list[UNetInputs]]:
    """The LCM multistep sampler with `unet`; returns the final x0 estimate and every UNet input it made."""
    scheduler = LCMScheduler()
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    seen, denoised = [], None
    for t in scheduler.timesteps:
        seen.append(UNetInputs(x_t, t.float().expand(x_t.shape[0]).clone(), context, w_emb))
        with torch.inference_mode():
            pred = unet(x_t, t, context, timestep_cond=w_emb, return_dict=False)[0]
        x_t, denoised = scheduler.step(pred, t, x_t, generator=generator, return_dict=False)
    return denoised, seen


def trajectories(unet: UNet2DConditionModel, args: argparse.Namespace, latent: int) -> list[dict[str, Any]]:
    """Start points (x_T, c, w) for `--trajectories` sampler runs, seeded; SD's CLIP embeddings are ~N(0, 1)."""
    cfg = unet.config
    runs = []
    for i in range(args.trajectories):
        g = torch.Generator().manual_seed(1000 + i)
        w_emb = None
        if cfg.time_cond_proj_dim is not None:
            w = torch.full((args.batch,), GUIDANCE - 1.0)
            w_emb = guidance_scale_embedding(w, embedding_dim=cfg.time_cond_proj_dim)
        runs.append(
            {
                "x_t": torch.randn(args.batch, cfg.in_channels, latent, latent, generator=g),
                "context": torch.randn(args.batch, TEXT_TOKENS, cfg.cross_attention_dim, generator=g),
                "w_emb": w_emb,
                "seed": i,
            }
        )
    return runs


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    diff = (out - ref).double()
    rel = (diff.pow(2).mean() / ref.double().pow(2).mean()).sqrt()
    return {"max_abs": float(diff.abs().max()), "rel_rms": float(rel)}


def time_rounds(variants: dict[str, Callable], inputs: UNetInputs, repeats: int) -> dict[str, list[float]]:
    """One warm-up call each, then `repeats` rounds that alternate the variants (so drift hits all alike)."""
    args = (inputs.sample, inputs.timestep, inputs.encoder_hidden_states)
    kwargs = {"timestep_cond": inputs.timestep_cond, "return_dict": False}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for fn in variants.values():
            fn(*args, **kwargs)
        for r in range(repeats):
            names = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in names:
                started = time.perf_counter()
                variants[name](*args, **kwargs)
                times[name].append(time.perf_counter() - started)
    return times


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch and OpenVINO threads (default 1)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="half", help="UNet size (default half)")
    p.add_argument("--model", default=None, help="a diffusers UNet folder (config.json + weights) instead")
    p.add_argument("--latent", type=int, default=32, help="latent side; the image is 8x (default 32: 256²)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="LCM steps per calibration/evaluation run")
    p.add_argument(
        "--trajectories", type=int, default=3, help="sampler runs; the last is held out (default 3)"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after warm-up (default 5)")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma list of {list(PRECISIONS)}")
    p.add_argument(
        "--cache-dir", default=None, help="openvino_unet cache_dir: trace the fp32 graph once for all"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--name", default=None, help="results file name (default openvino_unet_<preset>_t<threads>)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    precisions = [p for p in args.precisions.split(",") if p]
    unet = build_unet(args)
    n_params = sum(p.numel() for p in unet.parameters())
    print(
        f"UNet {args.model or args.preset}: {n_params / 1e6:.0f}M parameters, latent {args.latent}², "
        f"batch {args.batch}, {args.threads} thread(s)"
    )

    # 1. real sampler inputs from the eager UNet; the last run is held out for evaluation
    runs = trajectories(unet, args, args.latent)
    eager_x0, recorded = [], []
    for run in runs:
        x0, seen = lcm_sample(unet, run["x_t"], run["context"], run["w_emb"], args.steps, run["seed"])
        eager_x0.append(x0)
        recorded.append(seen)
    calibration = [item for seen in recorded[:-1] for item in seen]
    held_out, held_run = recorded[-1], runs[-1]

    # 2. convert every precision
    variants: dict[str, Callable] = {"eager": unet}
    convert_s: dict[str, float] = {}
    for precision in precisions:
        started = time.perf_counter()
        variants[f"ov-{precision}"] = openvino_unet(
            unet,
            batch_size=args.batch,
            height=8 * args.latent,
            width=8 * args.latent,
            precision=precision,
            calibration=calibration,
            threads=args.threads,
            cache_dir=args.cache_dir,
        )
        convert_s[f"ov-{precision}"] = time.perf_counter() - started
        print(f"converted {precision} in {convert_s[f'ov-{precision}']:.1f} s")

    # 3. quality on the held-out run: one call (the mid step) and the whole sampler
    probe = held_out[len(held_out) // 2]
    ref = probe.run(unet)
    quality: dict[str, dict[str, float]] = {}
    for name, fn in variants.items():
        out = probe.run(fn)
        x0, _ = lcm_sample(
            fn, held_run["x_t"], held_run["context"], held_run["w_emb"], args.steps, held_run["seed"]
        )
        quality[name] = {
            **{f"call_{k}": v for k, v in errors(out, ref).items()},
            **{f"x0_{k}": v for k, v in errors(x0, eager_x0[-1]).items()},
        }

    # 4. speed, alternating
    times = time_rounds(variants, probe, args.repeats)
    eager_med, eager_min = statistics.median(times["eager"]), min(times["eager"])
    rows = []
    print(
        f"\n{'variant':<18}{'median s':>10}{'speedup':>9}{'min s':>8}{'speedup':>9}{'call max|d|':>13}"
        f"{'call relRMS':>13}{'x0 max|d|':>11}{'x0 relRMS':>11}{'convert s':>11}"
    )
    for name, ts in times.items():
        med, low, q = statistics.median(ts), min(ts), quality[name]
        row = {"variant": name, "median_s": med, "speedup": eager_med / med, "min_s": low}
        row |= {"speedup_min": eager_min / low, "times_s": ts, "convert_s": convert_s.get(name), **q}
        rows.append(row)
        print(
            f"{name:<18}{med:>10.3f}{eager_med / med:>8.2f}x{low:>8.3f}{eager_min / low:>8.2f}x"
            f"{q['call_max_abs']:>13.2e}{q['call_rel_rms']:>13.2e}{q['x0_max_abs']:>11.2e}{q['x0_rel_rms']:>11.2e}"
            f"{convert_s.get(name, 0.0):>11.1f}"
        )
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {peak_gb:.1f} GB")

    import nncf
    import openvino

    report = {
        "args": vars(args),
        "unet_parameters": n_params,
        "machine": {"cpu": cpu_name(), "cpus": os.cpu_count()},
        "versions": {"torch": torch.__version__, "openvino": openvino.__version__, "nncf": nncf.__version__},
        "calibration_calls": len(calibration),
        "peak_rss_gb": peak_gb,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{args.name or f'openvino_unet_{args.preset}_t{args.threads}'}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
