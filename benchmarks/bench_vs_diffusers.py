"""lcmkit against diffusers on SD1.5-size LCM text-to-image, side by side in one run, on the CPU.

    .venv/bin/python benchmarks/bench_vs_diffusers.py --quick           # 256² only, 1 repetition: a few minutes
    .venv/bin/python benchmarks/bench_vs_diffusers.py                   # 256² and 512², 3 repetitions
    .venv/bin/python benchmarks/bench_vs_diffusers.py --quick --fast    # plus TAESD and sub-pixel decoder columns
    .venv/bin/python benchmarks/bench_vs_diffusers.py --fast --openvino int8-weights int8   # plus OpenVINO UNets
    .venv/bin/python benchmarks/bench_vs_diffusers.py --openvino fp32   # plus OV UNet + OV VAE decoder, exact

Weights are random with the SD1.5 architecture (UNet with `time_cond_proj_dim=256`, the SD VAE, a CLIP ViT-L/14 text
encoder), built once with a fixed seed and saved as a diffusers `LatentConsistencyModelPipeline` folder at
`--model-dir` (reused when present). The SAME folder is loaded into both libraries. Timing is per stage (text
encoder, each UNet call, VAE decode, through forward hooks and a wrapper on `vae.decode` during ordinary pipeline
calls) and end to end, after one warm-up call per library and size, alternating which library goes first. Peak RSS
comes from a child process per library that only loads and runs that pipeline once (lcmkit twice: as it comes, with
weight paging, and with `disable_weight_paging()`, every weight resident). FLOPs come from
`torch.utils.flop_counter.FlopCounterMode` on one UNet call and one decode, and are compared with a 4096² fp32
matmul timed in the same run (the practical peak of PyTorch's kernels here). lcmkit's convolutions are counted as
direct ones (its sub-pixel upsamplers as the 2x2 convolutions they are), so where its Winograd path runs, its
GFLOP/s are direct-convolution equivalents.

With `--openvino fp32` (or int8-weights), besides "lcmkit + TAESD + OV UNet", a column runs the OpenVINO UNet with
the full SD VAE's decoder also on OpenVINO at that precision and no TAESD (`lcmkit.accel.use_openvino_vae_decoder`):
for fp32 the exact-arithmetic OpenVINO mode. Its decoder's one-time conversion and its compile for the size are
timed apart, and its image is compared with diffusers' (max abs difference).

Prints a table and writes JSON to `benchmarks/results/<name>.json`. Random weights say nothing about image
quality: the TAESD columns measure speed only.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
STEPS = 4
GUIDANCE = 8.0
SEED = 0

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    time_cond_proj_dim=256,
)
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
CLIP_L14 = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=0,  # the values in openai/clip-vit-large-patch14's config.json
    eos_token_id=2,
    pad_token_id=1,
)


# ----------------------------------------------------------------------------------------------------------------------
# Machine and model folder


def machine_info() -> dict[str, Any]:
    cpu, flags, mem_kb = "unknown", set(), 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    import diffusers
    import transformers

    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "isa": sorted(
            f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags
        ),
        "mem_gb": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _tokenizer(folder: Path) -> Any:
    """The CLIP ViT-L/14 tokenizer lcmkit ships; the character-level test tokenizer if the files are absent."""
    from transformers import CLIPTokenizer

    import lcmkit

    shipped = Path(lcmkit.__file__).parent / "assets" / "clip_vit_l14_tokenizer"
    if (shipped / "vocab.json").is_file() and (shipped / "merges.txt").is_file():
        return CLIPTokenizer.from_pretrained(shipped), "clip_vit_l14 (lcmkit assets)"
    from lcmkit.tiny import write_char_clip_tokenizer

    return CLIPTokenizer.from_pretrained(
        write_char_clip_tokenizer(folder / "_char_tokenizer")
    ), "character-level"


def ensure_model(folder: Path) -> dict[str, Any]:
    """Build and save the random SD1.5-architecture LCM folder once (seed 0); reuse it afterwards."""
    if (folder / "model_index.json").is_file():
        print(f"reusing {folder}")
        return (
            json.loads((folder / "bench_info.json").read_text())
            if (folder / "bench_info.json").is_file()
            else {}
        )
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    print(f"building random SD1.5-architecture weights into {folder} (once) ...", flush=True)
    t0 = time.perf_counter()
    tokenizer, tokenizer_kind = _tokenizer(folder)
    torch.manual_seed(SEED)
    pipe = diffusers.LatentConsistencyModelPipeline(
        vae=diffusers.AutoencoderKL(**SD_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L14)),
        tokenizer=tokenizer,
        unet=diffusers.UNet2DConditionModel(**SD15_UNET),
        scheduler=diffusers.LCMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    del pipe
    gc.collect()
    info = {"seed": SEED, "tokenizer": tokenizer_kind, "build_s": round(time.perf_counter() - t0, 1)}
    (folder / "bench_info.json").write_text(json.dumps(info, indent=2))
    print(f"built in {info['build_s']} s", flush=True)
    return info


def quiet_loaders() -> None:
    """No loading progress bars from diffusers / transformers in the benchmark's output."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def load(lib: str, folder: Path) -> tuple[Any, float]:
    quiet_loaders()
    t0 = time.perf_counter()
    if lib == "diffusers":
        import diffusers

        pipe = diffusers.LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None)
    else:
        import lcmkit

        pipe = lcmkit.LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe, time.perf_counter() - t0


def generate(pipe: Any, size: int, output_type: str = "np") -> Any:
    return pipe(
        PROMPT,
        height=size,
        width=size,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(SEED),
        output_type=output_type,
    ).images


# ----------------------------------------------------------------------------------------------------------------------
# Stage timing


class StageTimer:
    """Times the text encoder and every UNet call (forward hooks) and `vae.decode` (an instance-level wrapper).

    `sync` (e.g. `torch.cuda.synchronize`) is called at every start and stop, so that times on an asynchronous
    device cover the work itself rather than its queueing.
    """

    def __init__(self, pipe: Any, sync: Callable[[], None] | None = None) -> None:
        self.pipe = pipe
        self.sync = sync or (lambda: None)
        self.times: dict[str, list[float]] = {}
        self._starts: dict[str, float] = {}
        self._handles: list[Any] = []
        self._original_decode: Callable | None = None
        self._wrapped: list[Any] = []

    def _timed(self, name: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.times.setdefault(name, []).append(time.perf_counter() - t0)
            return out

        return timed

    def _pre(self, name: str) -> Callable:
        def hook(*_: Any) -> None:
            self.sync()
            self._starts[name] = time.perf_counter()

        return hook

    def _post(self, name: str) -> Callable:
        def hook(*_: Any) -> None:
            self.sync()
            self.times.setdefault(name, []).append(time.perf_counter() - self._starts.pop(name))

        return hook

    def __enter__(self) -> StageTimer:
        for name in ("text_encoder", "unet"):
            module = getattr(self.pipe, name)
            if isinstance(module, torch.nn.Module):
                self._handles += [
                    module.register_forward_pre_hook(self._pre(name)),
                    module.register_forward_hook(self._post(name)),
                ]
            else:  # an OpenVINO stand-in: its __call__ goes through forward, shadowed here on the instance
                self._wrapped.append(module)
                module.forward = self._timed(name, module.forward)
        vae = self.pipe.vae
        self._original_decode = vae.decode
        vae.decode = self._timed("vae_decode", vae.decode)  # shadows the method on this instance only
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self._wrapped:
            del module.forward
        del self.pipe.vae.decode  # back to the class's method


def timed_run(pipe: Any, size: int) -> tuple[dict[str, Any], np.ndarray]:
    with StageTimer(pipe) as timer:
        t0 = time.perf_counter()
        image = generate(pipe, size)
        total = time.perf_counter() - t0
    stages = timer.times
    known = sum(sum(v) for v in stages.values())
    record = {
        "end_to_end_s": total,
        "text_encoder_s": sum(stages.get("text_encoder", [0.0])),
        "unet_calls_s": stages.get("unet", []),
        "vae_decode_s": sum(stages.get("vae_decode", [0.0])),
        "other_s": total - known,
        "loadavg_after": os.getloadavg(),
    }
    return record, np.asarray(image)


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over repetitions; a UNet call's time is the median over all calls of all repetitions."""
    calls = [t for r in runs for t in r["unet_calls_s"]]
    return {
        "end_to_end_s": statistics.median(r["end_to_end_s"] for r in runs),
        "text_encoder_s": statistics.median(r["text_encoder_s"] for r in runs),
        "unet_call_s": statistics.median(calls) if calls else float("nan"),
        "unet_total_s": statistics.median(sum(r["unet_calls_s"]) for r in runs),
        "vae_decode_s": statistics.median(r["vae_decode_s"] for r in runs),
        "other_s": statistics.median(r["other_s"] for r in runs),
    }


# ----------------------------------------------------------------------------------------------------------------------
# FLOPs and peak


def matmul_peak(n: int = 4096, reps: int = 3) -> dict[str, float]:
    """GFLOP/s of an n x n fp32 matmul: the practical ceiling of PyTorch's kernels on this machine, right now."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    flops = 2 * n**3
    return {
        "n": n,
        "median_gflops": flops / statistics.median(times) / 1e9,
        "best_gflops": flops / min(times) / 1e9,
    }


def count_flops(pipe: Any, size: int) -> dict[str, float]:
    """FLOPs of one UNet call and one VAE decode at `size`, with the pipeline's own input shapes."""
    from torch.utils.flop_counter import FlopCounterMode

    latent = size // 8
    z = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(1))
    text = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(2))
    w_embedding = torch.randn(1, 256, generator=torch.Generator().manual_seed(3))
    out = {}
    # FlopCounterMode sees neither oneDNN's packed-weight convolution nor NNPACK's Winograd one (lcmkit.nn.conv):
    # count on the plain path, then put the defaults back. Packing does the same arithmetic; Winograd does about a
    # fifth of the multiplies, so lcmkit's GFLOP/s are direct-convolution equivalents where it applies.
    packing = getattr(pipe, "set_conv_prepacking", None)
    winograd = getattr(pipe, "set_conv_winograd", None)
    if packing is not None:
        packing("off")
        winograd("off")
    try:
        with torch.no_grad():
            with FlopCounterMode(display=False) as counter:
                pipe.unet(z, torch.tensor(999), encoder_hidden_states=text, timestep_cond=w_embedding)
            out["unet_call_flops"] = counter.get_total_flops()
            with FlopCounterMode(display=False) as counter:
                pipe.vae.decode(z / pipe.vae.config.scaling_factor)
            out["vae_decode_flops"] = counter.get_total_flops()
    finally:
        if packing is not None:
            packing("auto")
            winograd("auto")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Peak RSS in a child process


def child_main(lib: str, folder: Path, size: int) -> None:
    """Run in a fresh process: load one library's pipeline, generate once, report timings and peak RSS as JSON."""
    t0 = time.perf_counter()
    if lib == "diffusers":
        from diffusers import LatentConsistencyModelPipeline  # noqa: F401
    else:
        from lcmkit import LatentConsistencyModelPipeline  # noqa: F401,F811 (lcmkit imports lazily)
    import_s = time.perf_counter() - t0
    pipe, load_s = load(lib, folder)
    if lib == "lcmkit-resident":  # lcmkit with every weight kept resident (weight paging off)
        pipe.disable_weight_paging()
    t1 = time.perf_counter()
    generate(pipe, size)
    run_s = time.perf_counter() - t1
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    print(
        json.dumps(
            {"import_s": import_s, "load_s": load_s, "first_run_s": run_s, "peak_rss_gb": peak_kb / 2**20}
        )
    )


def peak_rss(lib: str, folder: Path, size: int, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", lib, "--model-dir", str(folder), "--size", str(size)]
    cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------------
# Fast options: TAESD decoder, sub-pixel upsampling


def tiny_pipe(ours: Any) -> Any:
    """lcmkit's pipeline with a random-weight TAESD (`AutoencoderTiny`, latent_channels 4) as its vae."""
    from lcmkit.models.tiny_vae import AutoencoderTiny, TinyVAEConfig

    torch.manual_seed(SEED)
    comps = {**ours.components, "vae": AutoencoderTiny(TinyVAEConfig()).eval()}
    pipe = type(ours)(**comps, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_upsample(reps: int) -> dict[str, Any]:
    """Plain nearest-2x + 3x3 conv against the sub-pixel form: 512 channels, 64² -> 128², fp32."""
    import torch.nn.functional as F

    from lcmkit.nn.fast_upsample import nearest2x_conv3x3, subpixel_kernels

    torch.manual_seed(SEED)
    conv = torch.nn.Conv2d(512, 512, 3, padding=1)
    x = torch.randn(1, 512, 64, 64)
    plain_t, sub_t = [], []
    with torch.no_grad():
        t0 = time.perf_counter()
        kernels = subpixel_kernels(conv.weight)
        kernel_s = time.perf_counter() - t0
        plain = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # warm-up both
        sub = nearest2x_conv3x3(x, conv.weight, conv.bias, kernels=kernels)
        for _ in range(reps):
            t0 = time.perf_counter()
            conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
            plain_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            nearest2x_conv3x3(x, conv.weight, conv.bias, kernels=kernels)
            sub_t.append(time.perf_counter() - t0)
    plain_s, sub_s = statistics.median(plain_t), statistics.median(sub_t)
    return {
        "case": "512 ch, 64x64 -> 128x128, batch 1, fp32",
        "plain_s": plain_s,
        "subpixel_s": sub_s,
        "speedup": plain_s / sub_s,
        "kernel_prep_s": kernel_s,
        "max_abs_diff": float((plain - sub).abs().max()),
        "plain_gflop": 2 * 512 * 512 * 9 * 128 * 128 / 1e9,
        "subpixel_gflop": 2 * 512 * 512 * 4 * 4 * 65 * 65 / 1e9,
        "reps": reps,
    }


def bench_fast(ours: Any, size: int, reps: int) -> dict[str, Any]:
    """lcmkit + TAESD end to end, and lcmkit's SD VAE decode with sub-pixel upsamplers (the default) vs the
    reference arithmetic (`disable_subpixel_upsampling`), on the same latents."""
    from lcmkit.nn.sampling import Upsample2D

    fast = tiny_pipe(ours)
    generate(fast, size)  # warm-up
    runs = [timed_run(fast, size)[0] for _ in range(reps)]
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(4))
    z = latents / ours.vae.config.scaling_factor
    plain_t, sub_t = [], []
    n = sum(isinstance(m, Upsample2D) for m in ours.vae.decoder.modules())
    with torch.no_grad():
        try:
            for _rep in range(reps + 1):  # rep 0 warms up both forms and is not counted
                ours.vae.disable_subpixel_upsampling()  # the reference arithmetic
                t0 = time.perf_counter()
                plain = ours.vae.decode(z).sample
                plain_t.append(time.perf_counter() - t0)
                ours.vae.enable_subpixel_upsampling()  # lcmkit's default
                t0 = time.perf_counter()
                sub = ours.vae.decode(z).sample
                sub_t.append(time.perf_counter() - t0)
        finally:
            ours.vae.enable_subpixel_upsampling()
    plain_s, sub_s = statistics.median(plain_t[1:]), statistics.median(sub_t[1:])
    return {
        "taesd": summarize(runs),
        "taesd_runs": runs,
        "sd_vae_decode_plain_s": plain_s,
        "sd_vae_decode_subpixel_s": sub_s,
        "sd_vae_decode_subpixel_speedup": plain_s / sub_s,
        "sd_vae_decode_subpixel_max_abs_diff_vs_plain": float((plain - sub).abs().max()),
        "subpixel_upsamplers": n,
    }


CALIBRATION_PROMPTS = (
    "a watercolor painting of a lighthouse at dusk",
    "a close-up photo of a red fox in the snow",
    "an isometric illustration of a tiny city",
    "a portrait of an old sailor, oil on canvas",
)


def bench_openvino_vae(
    ours: Any, unet: Any, size: int, reps: int, precision: str, cache: Path, images: dict[str, np.ndarray]
) -> dict[str, Any]:
    """lcmkit with the OpenVINO UNet `unet` and the SD VAE's decoder on OpenVINO at the same `precision`, no TAESD
    (for fp32: the exact-arithmetic OpenVINO mode). The decoder's conversion (a cache read on reruns) and its
    compile for this size (its first decode) are timed apart from generation; the last run's image is compared with
    `images` (diffusers' and eager lcmkit's, same seed)."""
    from lcmkit.accel import use_openvino_vae_decoder

    vae = copy.deepcopy(ours.vae)  # the stand-in replaces `vae.decoder` in place: `ours` keeps its eager one
    before = set(cache.glob("*.xml"))
    t0 = time.perf_counter()
    use_openvino_vae_decoder(vae, precision, cache_dir=cache)
    convert_s = time.perf_counter() - t0
    f = ours.vae_scale_factor
    t0 = time.perf_counter()
    with torch.no_grad():
        vae.decode(torch.zeros(1, vae.config.latent_channels, size // f, size // f))  # compiles this shape
    compile_s = time.perf_counter() - t0
    fast = type(ours)(**{**ours.components, "unet": unet, "vae": vae}, requires_safety_checker=False)
    fast.set_progress_bar_config(disable=True)
    generate(fast, size)  # warm-up
    runs, image = [], None
    for _ in range(reps):
        record, image = timed_run(fast, size)
        runs.append(record)
    diff = {
        lib: float(np.abs(image.astype(np.float64) - ref.astype(np.float64)).max())
        for lib, ref in images.items()
    }
    out = {
        "column": f"OV {precision} UNet + OV {precision} VAE decoder",
        "summary": summarize(runs),
        "runs": runs,
        "vae_decoder_convert_s": convert_s,
        "vae_decoder_compile_s": compile_s,
        "vae_decoder_converted_from_cache": set(cache.glob("*.xml")) == before,
        "max_abs_image_diff_vs_diffusers": diff["diffusers"],
        "max_abs_image_diff_vs_lcmkit": diff["lcmkit"],
    }
    print(f"  {out['column']}: {out['summary']['end_to_end_s']:.2f} s (decoder convert {convert_s:.0f} s, "
          f"compile {compile_s:.1f} s), max abs diff vs diffusers {diff['diffusers']:.2g}", flush=True)  # fmt: skip
    return out


def bench_openvino(
    ours: Any, size: int, reps: int, precisions: list[str], cache: Path, images: dict[str, np.ndarray]
) -> dict[str, Any]:
    """lcmkit + TAESD with the UNet compiled by OpenVINO at each precision (fixed shape: batch 1, this size), and
    for the data-free precisions also that UNet with the SD VAE's decoder on OpenVINO (`bench_openvino_vae`).

    Conversion (and, for the int8 precisions that quantize activations, calibration on 4 prompts of this size) is timed apart from generation; converted
    graphs are cached under `cache`, so a rerun reports a cache read instead (`converted_from_cache`).
    """
    from lcmkit.accel.openvino import (
        DATA_FREE_PRECISIONS,
        NEEDS_CALIBRATION,
        collect_unet_inputs,
        openvino_unet,
    )

    out: dict[str, Any] = {}
    for precision in precisions:
        t0 = time.perf_counter()
        calibration = None
        if precision in NEEDS_CALIBRATION:
            calibration = collect_unet_inputs(
                ours,
                CALIBRATION_PROMPTS,
                height=size,
                width=size,
                num_inference_steps=STEPS,
                guidance_scale=GUIDANCE,
            )
        calibrate_s = time.perf_counter() - t0
        before = set(cache.glob("*.xml"))
        t0 = time.perf_counter()
        unet = openvino_unet(ours.unet, height=size, width=size, precision=precision, calibration=calibration,
                             cache_dir=cache)  # fmt: skip
        convert_s = time.perf_counter() - t0
        fast = tiny_pipe(ours)
        fast.unet = unet
        generate(fast, size)  # warm-up
        runs = [timed_run(fast, size)[0] for _ in range(reps)]
        out[precision] = {
            "summary": summarize(runs),
            "runs": runs,
            "calibration_s": calibrate_s,
            "convert_and_compile_s": convert_s,
            "converted_from_cache": set(cache.glob("*.xml")) == before,  # no new graph written
        }
        print(f"  OpenVINO {precision} + TAESD: {out[precision]['summary']['end_to_end_s']:.2f} s "
              f"(convert + compile {convert_s:.0f} s, calibration {calibrate_s:.0f} s)", flush=True)  # fmt: skip
        del fast
        if precision in DATA_FREE_PRECISIONS:  # the ones use_openvino_vae_decoder offers
            gc.collect()
            out[precision]["unet_vae"] = bench_openvino_vae(ours, unet, size, reps, precision, cache, images)
        del unet, calibration
        gc.collect()
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Main


def compare_size(pipes: dict[str, Any], size: int, reps: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The timed side-by-side runs, and each library's last image (for the OpenVINO columns' differences)."""
    print(f"\n== {size}x{size}, {STEPS} steps: warm-up ...", flush=True)
    for pipe in pipes.values():
        generate(pipe, size)
    runs: dict[str, list] = {lib: [] for lib in pipes}
    images: dict[str, np.ndarray] = {}
    for rep in range(reps):
        order = list(pipes) if rep % 2 == 0 else list(reversed(pipes))
        for lib in order:
            record, images[lib] = timed_run(pipes[lib], size)
            runs[lib].append(record)
            print(f"  rep {rep} {lib:9s} {record['end_to_end_s']:7.2f} s", flush=True)
    diff = float(np.abs(images["lcmkit"].astype(np.float64) - images["diffusers"].astype(np.float64)).max())
    result = {
        "summary": {lib: summarize(r) for lib, r in runs.items()},
        "runs": runs,
        "max_abs_image_diff": diff,
    }
    return result, images


def efficiency(result: dict[str, Any], peak: float) -> dict[str, dict[str, float]]:
    """GFLOP/s per library for one UNet call, one decode and the whole call (text encoder FLOPs left out)."""
    out = {}
    for lib, s in result["summary"].items():
        fl = result["flops"][lib]
        total = STEPS * fl["unet_call_flops"] + fl["vae_decode_flops"]
        unet = fl["unet_call_flops"] / s["unet_call_s"] / 1e9
        dec = fl["vae_decode_flops"] / s["vae_decode_s"] / 1e9
        out[lib] = {
            "unet": unet,
            "unet_of_peak": unet / peak,
            "vae_decode": dec,
            "vae_decode_of_peak": dec / peak,
            "end_to_end": total / s["end_to_end_s"] / 1e9,
            "matmul_peak_gflops": peak,
        }
    return out


def print_table(size: int, result: dict[str, Any], peak: float) -> None:
    s = result["summary"]
    fast = result.get("fast", {}).get("taesd")
    extra = {"lcmkit+TAESD": fast} if fast else {}
    for precision, ov in result.get("openvino", {}).items():
        extra[f"OV {precision}+TAESD"] = ov["summary"]
    for precision, ov in result.get("openvino", {}).items():
        if "unet_vae" in ov:
            extra[f"OV {precision}+OV VAE"] = ov["unet_vae"]["summary"]  # no TAESD: the SD VAE's decoder
    head = f"{'stage (median s)':22s}{'diffusers':>11s}{'lcmkit':>11s}{'speedup':>9s}"
    print(
        f"\n{size}x{size}  (speedup = diffusers / lcmkit)"
        + (
            "; TAESD columns use a random-weight TAESD: speed only"
            if any("TAESD" in n for n in extra)
            else ""
        )
    )
    print(head + "".join(f"{name:>22s}" for name in extra))
    for key in ("text_encoder_s", "unet_call_s", "unet_total_s", "vae_decode_s", "other_s", "end_to_end_s"):
        d, o = s["diffusers"][key], s["lcmkit"][key]
        line = f"{key[:-2]:22s}{d:11.3f}{o:11.3f}{d / o:9.2f}x"
        for col in extra.values():
            line += f"{col[key]:13.3f} ({d / col[key]:5.2f}x)"
        print(line)
    for lib, g in result["gflops"].items():
        print(
            f"{lib:9s} GFLOP/s: UNet {g['unet']:6.1f} ({g['unet_of_peak']:4.0%} of matmul {peak:.0f}), "
            f"decode {g['vae_decode']:6.1f} ({g['vae_decode_of_peak']:4.0%}), end to end {g['end_to_end']:6.1f}"
        )
    print(f"max |image lcmkit - image diffusers| = {result['max_abs_image_diff']:.3g} (np output in [0, 1])")
    for ov in result.get("openvino", {}).values():
        if "unet_vae" in ov:
            v = ov["unet_vae"]
            print(
                f"{v['column']}: max |image - image diffusers| = {v['max_abs_image_diff_vs_diffusers']:.3g} "
                f"(vs lcmkit eager {v['max_abs_image_diff_vs_lcmkit']:.3g}); decoder conversion "
                f"{v['vae_decoder_convert_s']:.1f} s{' (cache read)' if v['vae_decoder_converted_from_cache'] else ''}"
                f", compile for {size}x{size} {v['vae_decoder_compile_s']:.1f} s (one-time, not in the column)"
            )
    if "fast" in result:
        f = result["fast"]
        print(
            f"lcmkit SD VAE decode with sub-pixel upsamplers: {f['sd_vae_decode_subpixel_s']:.3f} s, plain "
            f"{f['sd_vae_decode_plain_s']:.3f} s ({f['sd_vae_decode_subpixel_speedup']:.2f}x), "
            f"max abs diff {f['sd_vae_decode_subpixel_max_abs_diff_vs_plain']:.2g}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="256x256 only, 1 repetition")
    p.add_argument("--fast", action="store_true", help="add lcmkit+TAESD and sub-pixel VAE decode columns")
    p.add_argument(
        "--openvino",
        nargs="+",
        default=[],
        choices=("fp32", "int8-weights", "int8"),
        help="add lcmkit + TAESD + OpenVINO UNet columns at these precisions, and for fp32 / int8-weights an OV "
        "UNet + OV VAE decoder column without TAESD (needs the openvino extra)",
    )
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes (default 256 512)")
    p.add_argument(
        "--reps", type=int, default=None, help="timed repetitions per size (default 3; 1 with --quick)"
    )
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/lcmkit-bench-sd15"))
    p.add_argument("--name", default=None, help="results file name (benchmarks/results/<name>.json)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all logical CPUs)")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    p.add_argument(
        "--note", default="", help="free text stored in the JSON (e.g. what else ran on the machine)"
    )
    p.add_argument("--child", choices=("diffusers", "lcmkit", "lcmkit-resident"), help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=256, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sizes = args.sizes or ([256] if args.quick else [256, 512])
    args.reps = args.reps or (1 if args.quick else 3)
    args.name = args.name or ("quick" if args.quick else "full") + ("_fast" if args.fast else "")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.child:
        child_main(args.child, args.model_dir, args.size)
        return
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_start": os.getloadavg(),
        "machine": machine_info(),
        "note": args.note,
        "settings": {
            "steps": STEPS,
            "guidance_scale": GUIDANCE,
            "seed": SEED,
            "prompt": PROMPT,
            "dtype": "float32",
        },
        "args": {
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if k not in ("child", "size")
        },
    }
    report["model"] = {"dir": str(args.model_dir), **ensure_model(args.model_dir)}
    if not args.no_rss:
        report["peak_rss"] = {}
        for size in args.sizes:
            for lib in ("diffusers", "lcmkit", "lcmkit-resident"):
                print(f"peak RSS child: {lib} at {size}x{size} ...", flush=True)
                report["peak_rss"][f"{lib}_{size}"] = peak_rss(
                    lib, args.model_dir, size, torch.get_num_threads()
                )
    pipes, load_s = {}, {}
    for lib in ("diffusers", "lcmkit"):
        pipes[lib], load_s[lib] = load(lib, args.model_dir)
    report["load_s_in_process"] = load_s
    # The peak is measured before and after every size; the machine is shared, so the best median is the ceiling.
    report["matmul_peaks"] = [matmul_peak()]
    report["sizes"] = {}
    for size in args.sizes:
        result, images = compare_size(pipes, size, args.reps)
        report["matmul_peaks"].append(matmul_peak())
        peak = max(m["median_gflops"] for m in report["matmul_peaks"])
        result["flops"] = {lib: count_flops(pipes[lib], size) for lib in pipes}
        if args.fast:
            result["fast"] = bench_fast(pipes["lcmkit"], size, args.reps)
        if args.openvino:
            cache = args.model_dir.with_name(args.model_dir.name + "-openvino")
            result["openvino"] = bench_openvino(
                pipes["lcmkit"], size, args.reps, args.openvino, cache, images
            )
            result["speedup_diffusers_over_openvino_taesd"] = {
                p: result["summary"]["diffusers"]["end_to_end_s"] / r["summary"]["end_to_end_s"]
                for p, r in result["openvino"].items()
            }
            result["speedup_diffusers_over_openvino_unet_vae"] = {
                p: result["summary"]["diffusers"]["end_to_end_s"] / r["unet_vae"]["summary"]["end_to_end_s"]
                for p, r in result["openvino"].items()
                if "unet_vae" in r
            }
        result["gflops"] = efficiency(result, peak)
        result["speedup_diffusers_over_lcmkit"] = {
            k: result["summary"]["diffusers"][k] / result["summary"]["lcmkit"][k]
            for k in result["summary"]["lcmkit"]
        }
        report["sizes"][str(size)] = result
        print_table(size, result, peak)
    report["upsample_subpixel"] = bench_upsample(max(3, args.reps))
    report["matmul_peaks"].append(matmul_peak())
    report["matmul_peak_gflops"] = max(m["median_gflops"] for m in report["matmul_peaks"])
    report["loadavg_end"] = os.getloadavg()
    u = report["upsample_subpixel"]
    print(
        f"\nnearest2x+conv3x3, {u['case']}: plain {u['plain_s']:.3f} s, sub-pixel {u['subpixel_s']:.3f} s "
        f"({u['speedup']:.2f}x), max abs diff {u['max_abs_diff']:.2g}"
    )
    peaks = ", ".join(f"{m['median_gflops']:.0f}" for m in report["matmul_peaks"])
    print(f"matmul 4096² fp32 GFLOP/s, start / after each size / end: {peaks}")
    print(f"load average (1, 5, 15 min): start {report['loadavg_start']}, end {report['loadavg_end']}")
    for key, value in report.get("peak_rss", {}).items():
        if "peak_rss_gb" in value:
            print(
                f"peak RSS {key}: {value['peak_rss_gb']:.2f} GB (cold: import {value['import_s']:.1f} s, "
                f"load {value['load_s']:.1f} s, first run {value['first_run_s']:.1f} s)"
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.name}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
