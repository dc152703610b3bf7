"""lcmkit against its peers on this CPU, side by side: diffusers, lcmkit exact, lcmkit fast (`enable_fast`) and
optimum-intel's OVLatentConsistencyModelPipeline at its defaults (what FastSD CPU runs), all on the SAME random
SD1.5-size LCM weights, 4 steps, guidance 8, one image per call.

    python benchmarks/bench_peers.py --quick          # 256x256, 3 rounds
    python benchmarks/bench_peers.py --sizes 256 512  # both sizes

How it measures, and why:
- every system runs in its own process, started afresh for each measurement, so its peak RSS is its own and its
  load-to-first-image is a real cold start of the process (with warm disk caches: a warm-up pass converts and
  caches first, and is not reported);
- rounds are interleaved (the order rotates each round), so background load hits every system alike; ratios are
  taken within a round (system time / diffusers time of that round), then the median over rounds;
- steady state is the median of the images after the first in one process; "first" is the time from process
  start to the first image (imports, loading, compiling and the image);
- image difference: max abs difference of the [0, 1] image against diffusers (and the fast mode against exact)
  from the same seed.
optimum-intel pins an older huggingface-hub than lcmkit's environment, so it runs in its own venv
(benchmarks/.venv-peers, created here on first use: it sees this environment's packages through a .pth file and
adds optimum-intel 2.2.0, its hub and transformers, and a diffusers it can import). The weights are exported to
OpenVINO IR once with optimum's own exporter (`from_pretrained(export=True)`, then `save_pretrained`).
stable-diffusion.cpp runs through stable-diffusion-cpp-python, compiled here for this CPU (GGML_NATIVE) into its
own venv (benchmarks/.venv-sdcpp, built on first use: 10-20 minutes on two cores; a failed build is remembered
in .venv-sdcpp/FAILED and the system reported unavailable with its reason; delete the folder to retry). It reads
the same weights written once as an original-layout single file (<model-dir>.original.safetensors, renamed by
tests/helpers/original_layout.py; sd.cpp's own diffusers-folder reader expects `text_model.`-prefixed text encoder
keys, which this folder's file lacks). It has no w-embedding: it drops the LCM UNet's `time_embedding.cond_proj`
on load (its list of unused tensors), and runs LCM as its users do with LCM-LoRA: the `lcm` sampler, 4 steps,
cfg 1.0, its default weight types (the file's, float32 here). Same UNet work per step as the others (one batch-1
evaluation), but different conditioning, so its image is not compared (the difference is null, with the reason).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PEERS_VENV = HERE / ".venv-peers"
PEERS_PYTHON = PEERS_VENV / "bin" / "python"
PEERS_PACKAGES = ("optimum-intel[openvino]==2.2.0", "diffusers==0.37.0")  # 0.37: imports with optimum's hub
SDCPP_VENV = HERE / ".venv-sdcpp"
SDCPP_PYTHON = SDCPP_VENV / "bin" / "python"
SDCPP_PACKAGE = "stable-diffusion-cpp-python==0.4.7"  # LCMKIT_SDCPP_SDIST=/path/to/sdist.tar.gz: a local one
SDCPP_CMAKE_ARGS = "-DGGML_NATIVE=ON -DSD_WEBP=OFF -DSD_WEBM=OFF"  # CPU only, for this CPU; no image codecs
# stable-diffusion.cpp is left out, with the reason, where it does not build
SYSTEMS = (
    "diffusers", "lcmkit-exact", "lcmkit-fast", "lcmkit-fast-bf16", "lcmkit-fast-int8", "optimum-intel",
    "stable-diffusion.cpp",
)  # fmt: skip
# lcmkit-fast is `--fast` as shipped (auto: on a CPU with int8 dot products, the int8 trial decides); -bf16 and
# -int8 are `--fast-precision bf16` (no trial) and `int8` (forced, no trial)
FAST_PRECISION = {"lcmkit-fast": "auto", "lcmkit-fast-bf16": "bf16", "lcmkit-fast-int8": "int8"}
PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
STEPS, GUIDANCE, SEED = 4, 8.0, 0
SDCPP = (
    "stable-diffusion-cpp-python 0.4.7 built here (GGML_NATIVE, CPU); loads the original-layout file and drops the "
    "LCM UNet's time_embedding.cond_proj (no w-embedding), so it runs LCM-LoRA style: sampler lcm, 4 steps, "
    "cfg 1.0, the file's float32 weights; its image is not comparable to diffusers' (different conditioning)"
)
SDCPP_NO_DIFF = "not comparable: sd.cpp drops the w-embedding (cond_proj), runs cfg 1; diffusers has w=8"


# Worker: one system, one process ------------------------------------------------------------------------------


def _load(system: str, model: Path, ir: Path, size: int, threads: int) -> Any:
    if system == "stable-diffusion.cpp":
        from stable_diffusion_cpp import StableDiffusion

        return StableDiffusion(model_path=str(sdcpp_file(model)), n_threads=threads, verbose=False)
    if system == "optimum-intel":
        from optimum.intel import OVLatentConsistencyModelPipeline

        return OVLatentConsistencyModelPipeline.from_pretrained(ir)  # its defaults: no reshape, its precision
    import torch

    torch.set_num_threads(threads)
    if system == "diffusers":
        import diffusers

        return diffusers.LatentConsistencyModelPipeline.from_pretrained(model, safety_checker=None)
    import lcmkit

    pipe = lcmkit.LatentConsistencyModelPipeline.from_pretrained(model, safety_checker=None)
    if system.startswith("lcmkit-fast"):
        from lcmkit.accel import enable_fast

        mode = enable_fast(pipe, precision=FAST_PRECISION[system], height=size, width=size, threads=threads)
        print(f"# {mode.describe()}", file=sys.stderr)
    return pipe


def _image(pipe: Any, size: int) -> np.ndarray:
    if type(pipe).__name__ == "StableDiffusion":  # stable-diffusion.cpp: no torch in that process
        images = pipe.generate_image(PROMPT, width=size, height=size, sample_method="lcm", sample_steps=STEPS,
                                     cfg_scale=1.0, seed=SEED)  # fmt: skip
        return np.asarray(images[0].convert("RGB"), dtype=np.float32) / 255.0
    import torch

    generator = torch.Generator().manual_seed(SEED)
    out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=size, width=size,
               generator=generator, output_type="np")  # fmt: skip
    return np.asarray(out.images[0], dtype=np.float32)


def worker(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    pipe = _load(args.worker, args.model_dir, args.ir_dir, args.size, args.threads)
    loaded = time.perf_counter()
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    times, first = [], None
    for i in range(1 + args.images):
        t = time.perf_counter()
        image = _image(pipe, args.size)
        times.append(time.perf_counter() - t)
        if i == 0:
            first = time.perf_counter() - started
            if args.save:
                np.save(args.save, image)
    result = {
        "load_s": loaded - started,
        "first_image_s": first,
        "steady_s": times[1:],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    print("RESULT " + json.dumps(result), flush=True)


# Driver ---------------------------------------------------------------------------------------------------------


def ensure_peers_venv() -> None:
    """benchmarks/.venv-peers: this environment's packages (a .pth) plus optimum-intel and what it pins."""
    if PEERS_PYTHON.exists() and _peer_ok():
        return
    import sysconfig

    subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    site = next((PEERS_VENV / "lib").glob("python*/site-packages"))
    (site / "zz_lcmkit_main.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    constraints = PEERS_VENV / "constraints.txt"
    import torch

    constraints.write_text(f"torch=={torch.__version__.split('+')[0]}\n")  # keep this environment's torch
    pip = [str(PEERS_PYTHON), "-m", "pip", "install", "-q", "-c", str(constraints)]
    subprocess.run([*pip, *PEERS_PACKAGES], check=True)
    # a PyPI torchvision built for another torch breaks transformers' imports; optimum does not need it
    subprocess.run([str(PEERS_PYTHON), "-m", "pip", "uninstall", "-y", "-q", "torchvision"], check=False)
    if not _peer_ok():
        raise SystemExit("optimum-intel does not import in benchmarks/.venv-peers; see the errors above")


def _peer_ok() -> bool:
    code = "from optimum.intel import OVLatentConsistencyModelPipeline"
    return subprocess.run([str(PEERS_PYTHON), "-c", code], capture_output=True).returncode == 0


def ensure_sdcpp_venv() -> str | None:
    """benchmarks/.venv-sdcpp: this environment's packages (a .pth) plus stable-diffusion-cpp-python compiled here.

    Returns None when it imports, else why not. A failed build is remembered (FAILED) and not retried.
    """
    failed = SDCPP_VENV / "FAILED"
    if failed.is_file():
        return failed.read_text().strip() + f" (remembered; delete {SDCPP_VENV} to retry)"
    if SDCPP_PYTHON.exists() and _sdcpp_ok():
        return None
    import sysconfig

    subprocess.run([sys.executable, "-m", "venv", str(SDCPP_VENV)], check=True)
    site = next((SDCPP_VENV / "lib").glob("python*/site-packages"))
    (site / "zz_lcmkit_main.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    package = os.environ.get("LCMKIT_SDCPP_SDIST", SDCPP_PACKAGE)
    log = SDCPP_VENV / "build.log"
    print(f"building {package} into {SDCPP_VENV} (once, 10-20 min on two cores; log {log}) ...", flush=True)
    env = dict(os.environ, CMAKE_ARGS=SDCPP_CMAKE_ARGS)
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(min(os.cpu_count() or 1, 8)))
    pip = [str(SDCPP_PYTHON), "-m", "pip", "install", "-v", "--no-binary", "stable-diffusion-cpp-python"]
    with log.open("w") as out:
        done = subprocess.run([*pip, package], stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0 or not _sdcpp_ok():
        tail = [line.strip() for line in log.read_text(errors="replace").splitlines() if "rror" in line][-2:]
        reason = f"unavailable: building {package} failed ({' | '.join(tail) or 'see ' + str(log)})"
        failed.write_text(reason + "\n")
        return reason
    return None


def _sdcpp_ok() -> bool:
    code = "from stable_diffusion_cpp import StableDiffusion"
    return subprocess.run([str(SDCPP_PYTHON), "-c", code], capture_output=True).returncode == 0


def sdcpp_file(model: Path) -> Path:
    return model.parent / f"{model.name}.original.safetensors"


def ensure_sdcpp_file(model: Path) -> Path:
    """The diffusers folder as one original-layout (CompVis) SD file, written once with the test helper's renaming;
    the LCM UNet's cond_proj is kept under the name diffusers' converter writes (sd.cpp skips it)."""
    import importlib.util

    from safetensors.torch import load_file, save_file

    path, unet = sdcpp_file(model), model / "unet" / "diffusion_pytorch_model.safetensors"
    if path.is_file() and path.stat().st_mtime >= unet.stat().st_mtime:
        return path
    print(f"writing {model} as one original-layout file {path} (once) ...", flush=True)
    spec = importlib.util.spec_from_file_location(
        "original_layout", HERE.parent / "tests/helpers/original_layout.py"
    )
    layout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layout)
    layers = json.loads((model / "unet" / "config.json").read_text())["layers_per_block"]
    levels = len(json.loads((model / "vae" / "config.json").read_text())["block_out_channels"])
    sd = layout.unet_to_original(load_file(unet), layers)
    sd.update(
        layout.vae_to_original(load_file(model / "vae" / "diffusion_pytorch_model.safetensors"), levels)
    )
    sd.update(layout.text_to_original(load_file(model / "text_encoder" / "model.safetensors")))
    partial = path.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(partial))
    partial.replace(path)
    return path


def ensure_optimum_ir(model: Path, ir: Path) -> None:
    if (ir / "model_index.json").is_file():
        return
    print(f"exporting {model} to OpenVINO IR with optimum-intel's exporter (once) ...", flush=True)
    code = (
        "import sys; from optimum.intel import OVLatentConsistencyModelPipeline as P; "
        "P.from_pretrained(sys.argv[1], export=True, compile=False).save_pretrained(sys.argv[2])"
    )
    subprocess.run([str(PEERS_PYTHON), "-c", code, str(model), str(ir)], check=True)


def run_one(
    system: str, size: int, args: argparse.Namespace, save: Path | None, images: int
) -> dict[str, Any]:
    venvs = {"optimum-intel": PEERS_PYTHON, "stable-diffusion.cpp": SDCPP_PYTHON}
    python = venvs.get(system, Path(sys.executable))
    cmd = [str(python), __file__, "--worker", system, "--size", str(size), "--images", str(images),
           "--threads", str(args.threads), "--model-dir", str(args.model_dir), "--ir-dir", str(args.ir_dir)]  # fmt: skip
    if save is not None:
        cmd += ["--save", str(save)]
    env = dict(os.environ, LCMKIT_OPENVINO_CACHE=str(args.cache_dir), OMP_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = str(HERE.parent / "src") + os.pathsep + env.get("PYTHONPATH", "")
    load = os.getloadavg()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}", "loadavg": load}
    return {**json.loads(lines[-1][len("RESULT ") :]), "loadavg": load}


def bench_size(size: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    systems = list(args.systems)
    print(f"\n{size}x{size}: warm-up (converts and caches; not reported)", flush=True)
    for system in systems:
        warm = run_one(system, size, args, work / f"{system}-{size}.npy", images=0)
        done = warm.get("error") or f"ok ({warm['first_image_s']:.1f} s)"
        print(f"  {system:20s} {done}", flush=True)
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = systems[r % len(systems) :] + systems[: r % len(systems)]
        this = {system: run_one(system, size, args, None, args.images) for system in order}
        rounds.append(this)
        print(f"  round {r + 1} ({', '.join(order)}): " + ", ".join(
            f"{s} {statistics.median(v['steady_s']):.2f}s" if "steady_s" in v else f"{s} {v['error']}"
            for s, v in this.items()), flush=True)  # fmt: skip
    return {"rounds": rounds, "summary": summarize(rounds, systems, size, work)}


def summarize(rounds: list[dict[str, Any]], systems: list[str], size: int, work: Path) -> dict[str, Any]:
    images = {s: np.load(work / f"{s}-{size}.npy") for s in systems if (work / f"{s}-{size}.npy").exists()}
    out: dict[str, Any] = {}
    for s in systems:
        ok = [r for r in rounds if "steady_s" in r[s] and "steady_s" in r["diffusers"]]
        if not ok:
            out[s] = {"error": next((r[s].get("error") for r in rounds), "no rounds")}
            continue
        ratios = [
            statistics.median(r["diffusers"]["steady_s"]) / statistics.median(r[s]["steady_s"]) for r in ok
        ]
        row = {
            "steady_s_median": statistics.median(statistics.median(r[s]["steady_s"]) for r in ok),
            "speed_vs_diffusers_median": statistics.median(ratios),
            "speed_vs_diffusers_per_round": ratios,
            "first_image_s_median": statistics.median(r[s]["first_image_s"] for r in ok),
            "peak_rss_gb_max": max(r[s]["peak_rss_gb"] for r in ok),
        }
        if s == "stable-diffusion.cpp":
            row["max_abs_vs_diffusers"], row["image_note"] = None, SDCPP_NO_DIFF
        elif s in images and "diffusers" in images:
            row["max_abs_vs_diffusers"] = float(np.abs(images[s] - images["diffusers"]).max())
        out[s] = row
    for fast in FAST_PRECISION:
        if fast in images and "lcmkit-exact" in images and fast in out:
            out[fast]["max_abs_vs_exact"] = float(np.abs(images[fast] - images["lcmkit-exact"]).max())
            mse = float(np.mean((images[fast].astype(np.float64) - images["lcmkit-exact"]) ** 2))
            out[fast]["psnr_vs_exact_db"] = float("inf") if mse == 0 else 10 * np.log10(1 / mse)
        if (
            fast in out
            and "steady_s_median" in out[fast]
            and "steady_s_median" in out.get("optimum-intel", {})
        ):
            mine, opt = out[fast], out["optimum-intel"]
            per_round = [
                statistics.median(r["optimum-intel"]["steady_s"]) / statistics.median(r[fast]["steady_s"])
                for r in rounds
                if "steady_s" in r["optimum-intel"] and "steady_s" in r[fast]
            ]
            out[f"{fast}_vs_optimum"] = {
                "speed_median": statistics.median(per_round),
                "speed_per_round": per_round,
                "first_image_ratio": mine["first_image_s_median"] / opt["first_image_s_median"],
                "peak_rss_ratio": mine["peak_rss_gb_max"] / opt["peak_rss_gb_max"],
            }
    return out


def print_table(size: int, summary: dict[str, Any]) -> None:
    print(f"\n{size}x{size}  (speed = diffusers time / system time, same round; median over rounds)")
    print(
        f"{'system':20s} {'steady s':>9s} {'speed':>6s} {'first s':>8s} {'RSS GB':>7s} {'vs diffusers':>12s}"
    )
    for s, row in summary.items():
        if s.endswith("_vs_optimum"):
            continue
        if "error" in row:
            print(f"{s:20s} {row['error']}")
            continue
        diff = row.get("max_abs_vs_diffusers", float("nan"))
        diff = f"{diff:12.2e}" if diff is not None else f"{'n/a':>12s}"  # not comparable (image_note)
        print(f"{s:20s} {row['steady_s_median']:9.2f} {row['speed_vs_diffusers_median']:5.2f}x "
              f"{row['first_image_s_median']:8.1f} {row['peak_rss_gb_max']:7.2f} {diff}")  # fmt: skip
    for key, f in summary.items():
        if key.endswith("_vs_optimum"):
            print(f"{key.removesuffix('_vs_optimum')} vs optimum: {f['speed_median']:.2f}x speed, first image "
                  f"{f['first_image_ratio']:.2f}x its time, peak RSS {f['peak_rss_ratio']:.2f}x its RSS")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="256x256 only")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images", type=int, default=2, help="steady-state images per process, after the first")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/lcmkit-bench-sd15"))
    p.add_argument("--ir-dir", type=Path, default=Path("/tmp/lcmkit-bench-sd15-optimum-ir"))
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/lcmkit-bench-sd15-ov-cache"))
    p.add_argument("--name", default=None, help="results file name (benchmarks/results/<name>.json)")
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=256, help=argparse.SUPPRESS)
    p.add_argument("--save", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if "diffusers" not in args.systems:
        raise SystemExit("--systems must include diffusers: every ratio is to diffusers in the same round")
    sys.path.insert(0, str(HERE))
    from bench_vs_diffusers import ensure_model, machine_info

    sizes = [256] if args.quick else args.sizes
    info = {
        "machine": machine_info(),
        "build": ensure_model(args.model_dir),
        "loadavg_start": os.getloadavg(),
    }
    if "optimum-intel" in args.systems:
        ensure_peers_venv()
        ensure_optimum_ir(args.model_dir, args.ir_dir)
    sdcpp = (ensure_sdcpp_venv() or SDCPP) if "stable-diffusion.cpp" in args.systems else "not requested"
    if sdcpp.startswith("unavailable"):
        print(f"stable-diffusion.cpp: {sdcpp}", flush=True)
        args.systems = [s for s in args.systems if s != "stable-diffusion.cpp"]
    elif "stable-diffusion.cpp" in args.systems:
        ensure_sdcpp_file(args.model_dir)
    work = args.cache_dir.parent / "lcmkit-bench-peers-images"
    work.mkdir(parents=True, exist_ok=True)
    results = {
        "info": info,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "stable-diffusion.cpp": sdcpp,
    }
    for size in sizes:
        results[str(size)] = bench_size(size, args, work)
        print_table(size, results[str(size)]["summary"])
    results["loadavg_end"] = os.getloadavg()
    name = args.name or f"peers_{'quick' if args.quick else 'full'}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))
    print(f"\nstable-diffusion.cpp: {sdcpp}\nwrote {RESULTS / f'{name}.json'}")


if __name__ == "__main__":
    main()
