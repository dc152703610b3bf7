"""What the per-shape probes (`FastPaths.choose="probe"`, `lcmkit.nn.probe`) pick on this machine for SD1.5 sizes.

Builds random convolutions and upsamplers of the SD1.5 UNet's and VAE decoder's shapes (no model download), asks
each of them the questions the models ask at first use (packed weights, Winograd, the VAE level layout, the
sub-pixel upsampler), with a fresh prober and cache folder so everything is measured now, and prints each decision
with its timings and what the fixed thresholds would have picked. Writes `benchmarks/results/<name>.json`.

    .venv/bin/python benchmarks/probe_paths.py                      # 256 and 512
    .venv/bin/python benchmarks/probe_paths.py --sizes 512 --threads 2 --name probe_paths_512
    .venv/bin/python benchmarks/probe_paths.py --keep      # also fill this machine's probe cache for SD1.5 sizes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from lcmkit.nn import fast, probe
from lcmkit.nn.conv import Conv2d
from lcmkit.nn.fast import DerivedWeight
from lcmkit.nn.sampling import Upsample2D

RESULTS = Path(__file__).parent / "results"

# (in, out, latent divisor, stride): the UNet's distinct 3x3 convolutions at SD1.5 size (latent side / divisor)
UNET_CONVS = [
    (320, 320, 1, 1),
    (320, 320, 1, 2),
    (320, 640, 2, 1),
    (640, 640, 2, 1),
    (640, 640, 2, 2),
    (640, 1280, 4, 1),
    (1280, 1280, 4, 1),
    (1280, 1280, 4, 2),
    (1280, 1280, 8, 1),
    (2560, 1280, 8, 1),
    (2560, 1280, 4, 1),
    (1920, 1280, 4, 1),
    (1920, 640, 2, 1),
    (1280, 640, 2, 1),
    (960, 640, 2, 1),
    (960, 320, 1, 1),
    (640, 320, 1, 1),
]
UNET_UPSAMPLERS = [(1280, 8), (1280, 4), (640, 2)]  # channels, latent divisor of the input
# the VAE decoder: (in, out, latent multiplier) for each level's first conv and its others, and its upsamplers
VAE_CONVS = [(512, 512, 1), (512, 512, 2), (512, 256, 4), (256, 256, 4), (256, 128, 8), (128, 128, 8)]
VAE_UPSAMPLERS = [(512, 1), (512, 2), (256, 4)]


def _conv(cin: int, cout: int, stride: int = 1) -> Conv2d:
    conv = Conv2d(cin, cout, 3, stride=stride, padding=1, prepack="always", choose="probe").eval()
    conv.requires_grad_(False)
    return conv


def _threshold_packs(pixels: int) -> bool:
    return pixels <= fast.PACKED_MAX_PIXELS


def _threshold_winograd(cin: int, cout: int, pixels: int) -> bool:
    return pixels >= fast.WINOGRAD_MIN_PIXELS and min(cin, cout) >= fast.WINOGRAD_MIN_CHANNELS


def _ask(rows: list[dict], row: dict, before: set[str], question, *args):
    """`question(*args)`, recording in `row` the probe of its path made since `before` (key, winner, timings;
    a conv's forward also asks about Winograd, so the match is by path among the layer's probes)."""
    prober = probe.default_prober()
    answer = question(*args)
    made = [key for key in prober.entries() if key not in before and key.startswith(row["path"])]
    row["key"] = made[0] if made else None
    row["probe"] = prober.entries()[made[0]] if made else None
    rows.append(row)
    return answer


def _unet(size: int, rows: list[dict]) -> None:
    latent = size // 8
    for cin, cout, div, stride in UNET_CONVS:
        side = latent // div
        conv, x = _conv(cin, cout, stride), torch.randn(1, cin, side, side)
        before = set(probe.default_prober().entries())
        where = {"model": "unet", "size": size, "conv": f"{cin}->{cout}/{stride}", "map": side}
        pixels = side * side
        if pixels <= fast.PROBE_PACKED_MAX_PIXELS:
            row = {**where, "path": "prepack", "thresholds": _threshold_packs(pixels)}
            _ask(rows, row, before, fast.conv2d, conv, x, DerivedWeight())
        if stride == 1:
            row = {**where, "path": "winograd", "thresholds": _threshold_winograd(cin, cout, pixels)}
            _ask(rows, row, before, conv.takes_winograd, x.shape, x.dtype, x.device, "nchw")
    for channels, div in UNET_UPSAMPLERS:
        side = latent // div
        up = Upsample2D(channels, subpixel="auto").eval().requires_grad_(False)
        up.conv.choose = "probe"
        x = torch.randn(1, channels, side, side)
        row = {"model": "unet", "size": size, "conv": f"up {channels}", "map": side, "path": "subpixel"}
        before = set(probe.default_prober().entries())
        _ask(rows, {**row, "thresholds": side * side >= fast.SUBPIXEL_MIN_PIXELS}, before, up, x)


def _vae(size: int, rows: list[dict]) -> None:
    latent = size // 8
    for cin, cout, mult in VAE_CONVS:
        side = latent * mult
        conv, shape = _conv(cin, cout), (1, cin, side, side)
        where = {"model": "vae", "size": size, "conv": f"{cin}->{cout}", "map": side}
        before = set(probe.default_prober().entries())
        row = {**where, "path": "channels_last", "thresholds": True}
        found = _ask(rows, row, before, conv.prefers_channels_last, shape)
        alternative = "nchw" if found is False else "channels_last"
        row = {**where, "path": "winograd", "vs": alternative}
        row["thresholds"] = _threshold_winograd(cin, cout, side * side)
        _ask(rows, row, before, conv.takes_winograd, shape, torch.float32, torch.device("cpu"), alternative)
    for channels, mult in VAE_UPSAMPLERS:
        side = latent * mult
        up = Upsample2D(channels, subpixel="auto").eval().requires_grad_(False)
        up.conv.choose = "probe"
        x = torch.randn(1, channels, side, side).contiguous(memory_format=torch.channels_last)
        row = {"model": "vae", "size": size, "conv": f"up {channels}", "map": side, "path": "subpixel"}
        before = set(probe.default_prober().entries())
        _ask(rows, {**row, "thresholds": True}, before, up, x)  # the VAE's default is "always"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default="probe_paths")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="use (and fill) the real probe cache ($LCMKIT_PROBE_CACHE or ~/.cache/lcmkit) instead of a temporary "
        "one, so later runs of the models on this machine find these shapes decided",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict = {"machine": probe.machine_fingerprint(), "python": platform.python_version(), "sizes": {}}
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        if not args.keep:
            os.environ[probe.CACHE_ENV] = folder  # measure everything now, leave the user's cache alone
        for size in args.sizes:
            if not args.keep:  # a folder per size: every size is measured afresh
                os.environ[probe.CACHE_ENV] = str(Path(folder) / str(size))
            probe.set_prober(probe.Prober())
            rows: list[dict] = []
            start = time.perf_counter()
            _unet(size, rows)
            unet_seconds = time.perf_counter() - start
            _vae(size, rows)
            wall = {"unet": unet_seconds, "vae": time.perf_counter() - start - unet_seconds}
            report["sizes"][size] = {
                "wall_seconds": wall,
                "cache": str(probe.cache_path()),
                "decisions": rows,
            }
            _print(size, rows, wall)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{args.name}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


def _print(size: int, rows: list[dict], wall: dict) -> None:
    print(
        f"\n{size}x{size}: probing took {wall['unet']:.1f} s (UNet shapes), {wall['vae']:.1f} s (VAE shapes)"
    )
    print(f"{'model':5} {'path':13} {'conv':14} {'map':>5}  {'probe':9} {'thresholds':10}  ref ms / fast ms")
    for row in rows:
        entry = row["probe"]
        if entry is None:
            choice, times = "-", "not probed (outside the probe region, or another path took the call)"
        elif entry["winner"] == "skipped":
            choice = "threshold"
            times = f"{1e3 * entry['seconds']['reference']:.2f} / - (too slow to probe; {entry['rows']}x{entry.get('cols')})"
        else:
            choice, s = entry["winner"], entry["seconds"]
            times = (
                f"{1e3 * s['reference']:.2f} / {1e3 * s['fast']:.2f} ({entry['rows']}x{entry.get('cols')})"
            )
        print(
            f"{row['model']:5} {row['path']:13} {row['conv']:14} {row['map']:>5}  {choice:9} "
            f"{'fast' if row['thresholds'] else 'reference':10}  {times}"
        )


if __name__ == "__main__":
    main()
