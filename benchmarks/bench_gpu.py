"""lcmkit against diffusers on a CUDA GPU: SD1.5-size LCM text-to-image (and image-to-image), side by side in one run.

    python benchmarks/bench_gpu.py --model-dir /tmp/lcmkit-bench-sd15 --name gpu_h200

The same random SD1.5-architecture folder as `bench_vs_diffusers.py` (built once, seed 0, reused when present) is
loaded into both libraries for each dtype (fp16 and fp32 by default) and moved to the GPU. For each size: one
warm-up call per library, then `--reps` calls alternating which library goes first, timed end to end and per
stage (text encoder, each UNet call, VAE decode) with `torch.cuda.synchronize()` at every boundary. It also reports
the peak GPU memory each library allocated for one call, the max abs difference between the two images (the
noise is drawn on the CPU from the same seed, so the images should agree up to the kernels' rounding), lcmkit
with a random TAESD decoder (speed only), and one image-to-image call per library. Not collected by pytest; the
CPU benchmark is `bench_vs_diffusers.py`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_diffusers import (  # noqa: E402 (the sibling script, not a package)
    GUIDANCE,
    PROMPT,
    RESULTS,
    SEED,
    STEPS,
    StageTimer,
    ensure_model,
    quiet_loaders,
    summarize,
    tiny_pipe,
)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEVICE = "cuda"  # --device; "cpu" only to smoke-test this script on a machine without a GPU


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def load(lib: str, folder: Path, dtype: torch.dtype) -> tuple[Any, float]:
    quiet_loaders()
    sync()
    t0 = time.perf_counter()
    if lib == "diffusers":
        import diffusers

        pipe = diffusers.LatentConsistencyModelPipeline.from_pretrained(
            folder, safety_checker=None, torch_dtype=dtype
        )
    else:
        import lcmkit

        pipe = lcmkit.LatentConsistencyModelPipeline.from_pretrained(
            folder, safety_checker=None, torch_dtype=dtype
        )
    pipe = pipe.to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    sync()
    return pipe, time.perf_counter() - t0


def generate(pipe: Any, size: int) -> np.ndarray:
    images = pipe(
        PROMPT,
        height=size,
        width=size,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(SEED),  # CPU noise: the same in both libraries
        output_type="np",
    ).images
    return np.asarray(images, dtype=np.float32)


def timed_run(pipe: Any, size: int) -> tuple[dict[str, Any], np.ndarray]:
    with StageTimer(pipe, sync=sync) as timer:
        sync()
        t0 = time.perf_counter()
        image = generate(pipe, size)
        sync()
        total = time.perf_counter() - t0
    stages = timer.times
    known = sum(sum(v) for v in stages.values())
    return {
        "end_to_end_s": total,
        "text_encoder_s": sum(stages.get("text_encoder", [0.0])),
        "unet_calls_s": stages.get("unet", []),
        "vae_decode_s": sum(stages.get("vae_decode", [0.0])),
        "other_s": total - known,
    }, image


def peak_memory(pipe: Any, size: int) -> float:
    """GiB the CUDA caching allocator held at most during one call, over what the weights already hold."""
    if DEVICE != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    generate(pipe, size)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def img2img(pipes: dict[str, Any], size: int) -> dict[str, Any]:
    """One image-to-image call per library (strength 0.5, 4 steps) from the same gradient image."""
    import diffusers
    from PIL import Image

    import lcmkit

    ramp = np.linspace(0, 255, size, dtype=np.float32)
    rgb = np.stack(
        [np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, -ramp) / 2 + 127, np.full((size, size), 90)]
    )
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8).transpose(1, 2, 0))
    out: dict[str, Any] = {}
    images = {}
    for lib, pipe in pipes.items():
        cls = (
            diffusers.LatentConsistencyModelImg2ImgPipeline
            if lib == "diffusers"
            else lcmkit.LatentConsistencyModelImg2ImgPipeline
        )
        i2i = cls(**pipe.components)
        i2i.set_progress_bar_config(disable=True)
        kwargs = dict(
            image=image,
            strength=0.5,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=torch.Generator().manual_seed(SEED),
            output_type="np",
        )
        i2i(PROMPT, **kwargs)  # warm-up
        sync()
        t0 = time.perf_counter()
        images[lib] = np.asarray(i2i(PROMPT, **kwargs).images, dtype=np.float32)
        sync()
        out[f"{lib}_s"] = time.perf_counter() - t0
    out["max_abs_diff"] = float(np.abs(images["lcmkit"] - images["diffusers"]).max())
    out["nan"] = {lib: int(np.isnan(img).sum()) for lib, img in images.items()}
    return out


def vae_layouts(pipe: Any, size: int, reps: int) -> dict[str, Any]:
    """lcmkit's VAE decode with NCHW against channels-last feature maps (`vae.set_memory_format`), same latents."""
    vae = pipe.vae
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(4))
    z = z.to(DEVICE, vae.dtype) / vae.config.scaling_factor
    formats = ("contiguous", "channels_last")
    times: dict[str, list[float]] = {f: [] for f in formats}
    outs = {}
    try:
        with torch.no_grad():
            for fmt in formats:  # warm-up (cuDNN picks its algorithms per layout)
                vae.set_memory_format(fmt)
                outs[fmt] = vae.decode(z).sample.float()
            for rep in range(reps):
                for fmt in formats if rep % 2 == 0 else formats[::-1]:
                    vae.set_memory_format(fmt)
                    sync()
                    t0 = time.perf_counter()
                    vae.decode(z)
                    sync()
                    times[fmt].append(time.perf_counter() - t0)
    finally:
        vae.set_memory_format("auto")
    med = {f: statistics.median(t) for f, t in times.items()}
    return {
        "contiguous_s": med["contiguous"],
        "channels_last_s": med["channels_last"],
        "channels_last_speedup": med["contiguous"] / med["channels_last"],
        "max_abs_diff": float((outs["contiguous"] - outs["channels_last"]).abs().max()),
    }


def compare(pipes: dict[str, Any], size: int, reps: int) -> dict[str, Any]:
    images: dict[str, np.ndarray] = {}
    runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in pipes}
    for lib, pipe in pipes.items():
        images[lib] = generate(pipe, size)  # warm-up (cuDNN autotuning, allocator growth)
    order = list(pipes)
    for rep in range(reps):
        for lib in order if rep % 2 == 0 else order[::-1]:
            record, images[lib] = timed_run(pipes[lib], size)
            runs[lib].append(record)
    result: dict[str, Any] = {lib: summarize(r) for lib, r in runs.items()}
    result["runs"] = runs
    result["peak_gpu_mem_gib"] = {lib: peak_memory(pipe, size) for lib, pipe in pipes.items()}
    result["speedup_end_to_end"] = result["diffusers"]["end_to_end_s"] / result["lcmkit"]["end_to_end_s"]
    result["speedup_unet_call"] = result["diffusers"]["unet_call_s"] / result["lcmkit"]["unet_call_s"]
    result["speedup_vae_decode"] = result["diffusers"]["vae_decode_s"] / result["lcmkit"]["vae_decode_s"]
    result["max_abs_diff"] = float(np.abs(images["lcmkit"] - images["diffusers"]).max())
    result["nan"] = {lib: int(np.isnan(img).sum()) for lib, img in images.items()}
    fast = tiny_pipe(pipes["lcmkit"]).to(DEVICE, pipes["lcmkit"].unet.dtype)
    generate(fast, size)
    result["lcmkit_taesd"] = summarize([timed_run(fast, size)[0] for _ in range(reps)])
    result["lcmkit_vae_layouts"] = vae_layouts(pipes["lcmkit"], size, reps)
    return result


def print_row(dtype: str, size: int, r: dict[str, Any]) -> None:
    d, o = r["diffusers"], r["lcmkit"]
    print(
        f"{dtype:>8} {size:>4}²  end to end {d['end_to_end_s'] * 1e3:7.1f} / {o['end_to_end_s'] * 1e3:7.1f} ms"
        f" ({r['speedup_end_to_end']:.2f}x)  UNet call {d['unet_call_s'] * 1e3:6.1f} / {o['unet_call_s'] * 1e3:6.1f} ms"
        f" ({r['speedup_unet_call']:.2f}x)  decode {d['vae_decode_s'] * 1e3:6.1f} / {o['vae_decode_s'] * 1e3:6.1f} ms"
        f" ({r['speedup_vae_decode']:.2f}x)  peak mem {r['peak_gpu_mem_gib']['diffusers']:.2f} /"
        f" {r['peak_gpu_mem_gib']['lcmkit']:.2f} GiB  max|diff| {r['max_abs_diff']:.2e}  nan {r['nan']}"
        f"  +TAESD {r['lcmkit_taesd']['end_to_end_s'] * 1e3:.1f} ms"
        f"  decode NCHW / channels-last {r['lcmkit_vae_layouts']['contiguous_s'] * 1e3:.1f} /"
        f" {r['lcmkit_vae_layouts']['channels_last_s'] * 1e3:.1f} ms",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/lcmkit-bench-sd15"))
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 768])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float16", "float32"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--name", default=None, help="results file name (benchmarks/results/<name>.json)")
    p.add_argument("--img2img-size", type=int, default=512)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); the CPU benchmark is bench_vs_diffusers.py"
        )
    import diffusers
    import transformers

    info = ensure_model(args.model_dir)
    props = torch.cuda.get_device_properties(0) if DEVICE == "cuda" else None
    report: dict[str, Any] = {
        "machine": {
            "gpu": props.name if props else "none (CPU smoke test)",
            "gpu_mem_gib": round(props.total_memory / 2**30, 1) if props else 0,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        },
        "model": info,
        "steps": STEPS,
        "guidance_scale": GUIDANCE,
        "reps": args.reps,
        "results": {},
    }
    print(json.dumps(report["machine"]), flush=True)
    print("dtype     size   diffusers / lcmkit", flush=True)
    for name in args.dtypes:
        dtype = DTYPES[name]
        pipes, load_s = {}, {}
        for lib in ("diffusers", "lcmkit"):
            pipes[lib], load_s[lib] = load(lib, args.model_dir, dtype)
        entry: dict[str, Any] = {"load_s": load_s}
        for size in args.sizes:
            entry[str(size)] = compare(pipes, size, args.reps)
            print_row(name, size, entry[str(size)])
        entry["img2img"] = {"size": args.img2img_size, **img2img(pipes, args.img2img_size)}
        print(f"{name:>8} img2img: {json.dumps(entry['img2img'])}", flush=True)
        report["results"][name] = entry
        del pipes
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    if args.name:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{args.name}.json"
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
