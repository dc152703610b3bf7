"""The `lcmkit` command line: `generate`, `img2img`, `demo`, `serve` and `distill`.

Thin on purpose: the model options become one `ModelSpec` (`lcmkit.spec`, shared with `lcmkit serve`), arguments (or
the lines of a prompts file) become `GenerationRequest`s, and `run_request` does the work, as it does for the HTTP
server, so a PNG made here carries the same AUTOMATIC1111 infotext as one made there. `distill` likewise only fills
a `DistillConfig` for `lcmkit.train.distill.distill`.

Every input mistake (options, the prompts file, --out, the model spec) is found before a model loads, and comes
back as one `lcmkit: error:` line, exit status 2. Heavy imports (torch, the pipelines) wait until a command needs
them, so those errors come back at once. Stdout lists what was written, one image a line (`PATH<TAB>seed N`);
progress, notes and errors go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from lcmkit.distributed import cli as distributed_cli
from lcmkit.presets import chosen_values, preset_names
from lcmkit.request import (
    OPTION_KEYS,
    GenerationRequest,
    apply_options,
    parse_float,
    parse_int,
    parse_seed,
    parse_size,
    resolve_seeds,
)
from lcmkit.spec import (
    DEFAULT_MODEL,
    DTYPES,
    FAST_PRECISIONS,
    FREEU_SD15,
    OPENVINO_PRECISIONS,
    ModelSpec,
    SpecError,
    check_runtime,
    fetch,
    load_pipeline,
)

if TYPE_CHECKING:
    import PIL.Image

__all__ = [
    "DEFAULT_MODEL",
    "FREEU_SD15",
    "OPENVINO_PRECISIONS",
    "main",
]  # the model constants live in lcmkit.spec
JSONL_SUFFIXES = (".jsonl", ".ndjson")
DEMO_PROMPT = "a red circle on a blue background"


@dataclass
class Item:
    """One prompt to run: its request (seed already decided), its init image (loaded when it runs) and, in a
    --prompts batch, where it came from (`file:line`), so a failure can say which line failed."""

    request: GenerationRequest
    image: Path | None = None
    where: str | None = None


class CliError(Exception):
    """A mistake in what the user typed or pointed at: one line on stderr, exit status 2."""

    exit_code = 2


class BatchError(CliError):
    """A --prompts line that failed while running (the model was fine with the others): exit status 1."""

    exit_code = 1


class BatchFailed(BatchError):
    """--keep-going ran every line and some failed: the summary lists them, one `file:line: message` a line."""

    def __init__(self, failures: list[str], total: int) -> None:
        lines = "\n".join(f"  {f}" for f in failures)
        super().__init__(f"{len(failures)} of {total} prompts failed:\n{lines}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line instead of argparse's usage block, in the same `lcmkit: error:` form as every other error."""
        print(f"lcmkit: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


class _HelpFormatter(argparse.HelpFormatter):
    """Shows `(default: X)` after every option that has a default (not for switches that are off, or None)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text, default = action.help or "", action.default
        unset = default is None or default is False or default is argparse.SUPPRESS or default in ("", [])
        if unset or not action.option_strings or "%(default)" in text:
            return text
        return f"{text} (default: %(default)s)"


# Values (more in lcmkit.request): each parser raises a ValueError that says what is allowed ------------


def parse_freeu(text: str) -> tuple[float, float, float, float]:
    parts = text.split(",")
    if len(parts) != 4:
        raise ValueError(
            f"--freeu takes 4 comma-separated numbers s1,s2,b1,b2 (or no value for the SD1.5 ones), got {text!r}; "
            "put the prompt before --freeu"
        )
    s1, s2, b1, b2 = (parse_float(p, "a --freeu value") for p in parts)
    return s1, s2, b1, b2


def parse_lora(text: str) -> tuple[str, float]:
    """`PATH[:WEIGHT]`. A tail after the last colon that looks like a path (`C:\\x`) stays part of the path."""
    path, sep, tail = text.rpartition(":")
    if not sep or "/" in tail or "\\" in tail:
        path, weight = text, 1.0
    else:
        weight = parse_float(tail, f"the weight in --lora {text!r} (PATH[:WEIGHT])")
    if not path:
        raise ValueError(f"--lora needs a file or hub id before the weight, as PATH[:WEIGHT], got {text!r}")
    if path.lower().endswith((".safetensors", ".bin", ".pt", ".ckpt")) and not Path(path).is_file():
        raise ValueError(f"--lora file not found: {path}")
    return path, weight


def parse_ip_adapter(text: str) -> tuple[str, float]:
    """`PATH[:SCALE]`: an IP-Adapter file (its `image_encoder/` folder beside it) or a folder holding
    ip-adapter_sd15.safetensors and image_encoder/; a tail that looks like a path stays part of the path."""
    path, sep, tail = text.rpartition(":")
    if not sep or "/" in tail or "\\" in tail:
        path, scale = text, 1.0
    else:
        scale = parse_float(tail, f"the scale in --ip-adapter {text!r} (PATH[:SCALE])")
    if not path:
        raise ValueError(
            f"--ip-adapter needs a file or folder before the scale, as PATH[:SCALE], got {text!r}"
        )
    if not Path(path).expanduser().exists():
        raise ValueError(f"--ip-adapter {path}: no such file or folder")
    return path, scale


@dataclass(frozen=True)
class ControlOption:
    """One `--control KIND=IMAGE[,scale=S][,start=A][,end=B]`: a ControlNet of that kind steered by IMAGE."""

    kind: str
    image: Path
    settings: tuple[tuple[str, float], ...] = ()


def parse_control(text: str) -> ControlOption:
    """`KIND=IMAGE` with optional `,scale=S`, `,start=A`, `,end=B` after the image (start/end: fractions of the
    steps). The image is read later (`control_units`), the rest is checked now."""
    from lcmkit.control import check_control_settings

    kind, eq, rest = text.partition("=")
    if not eq or not kind or not rest:
        raise ValueError(f"--control takes KIND=IMAGE[,scale=S][,start=A][,end=B], got {text!r}")
    pieces = rest.split(",")
    settings: dict[str, float] = {}
    while len(pieces) > 1 and re.fullmatch(r"(scale|start|end)=.*", pieces[-1]):
        key, _, value = pieces.pop().partition("=")
        try:
            settings[key] = float(value)
        except ValueError:
            raise ValueError(f"--control {text}: {key} must be a number, got {value!r}") from None
    try:
        check_control_settings(kind, **settings)
    except ValueError as e:
        raise ValueError(f"--control {text}: {e}") from None
    return ControlOption(kind, Path(",".join(pieces)).expanduser(), tuple(settings.items()))


def parse_controlnet(text: str) -> tuple[str, str]:
    """`KIND=PATH_OR_HUB_ID`: the ControlNet model to use for that kind."""
    kind, eq, source = text.partition("=")
    if not eq or not kind or not source:
        raise ValueError(f"--controlnet takes KIND=PATH_OR_HUB_ID, got {text!r}")
    return kind, source


def parse_limit(text: str) -> tuple[str, int]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise ValueError(f"--limit takes NAME=VALUE such as max_steps=8, got {text!r}")
    return key, parse_int(value, f"--limit {key}", 0)


def _arg(fn: Callable[..., Any], *extra: Any) -> Callable[[str], Any]:
    """An argparse type calling `fn(text, *extra)` whose ValueError message argparse shows as it is."""

    def convert(text: str) -> Any:
        try:
            return fn(text, *extra)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = fn.__name__
    return convert


# Arguments -------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", help="a diffusers folder, a .safetensors/.ckpt file or a hub id owner/name "
                       f"(default: the tiny model shipped with lcmkit, {DEFAULT_MODEL.name})")  # fmt: skip
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "--device", help="cpu, cuda, cuda:1, mps, ... (default: cuda when available, else cpu)"
    )
    where.add_argument("--dtype", choices=DTYPES, default="auto",
                       help="auto: float16 on CUDA, float32 elsewhere")  # fmt: skip
    pipe = argparse.ArgumentParser(add_help=False)
    add = pipe.add_argument
    add("--lora", action="append", default=[], type=_arg(parse_lora), metavar="PATH[:WEIGHT]",
        help="load a LoRA (file, folder or hub id), weight 1 by default; repeatable")  # fmt: skip
    add("--freeu", nargs="?", const=FREEU_SD15, type=_arg(parse_freeu), metavar="S1,S2,B1,B2",
        help="enable FreeU; without values the SD1.5 ones 0.9,0.2,1.5,1.6")  # fmt: skip
    add("--vae-tiling", action="store_true", help="decode in tiles (large images, less memory)")
    add(
        "--tiny-vae",
        metavar="FOLDER",
        help="fast mode: decode with a tiny VAE (AutoencoderTiny / TAESD folder)",
    )
    add("--openvino", choices=OPENVINO_PRECISIONS, metavar="PRECISION",
        help="fast mode: run the UNet and the VAE decoder with OpenVINO on the CPU, fp32 (the eager image up to "
        "rounding) or int8-weights; a --tiny-vae stays eager. Converted once (the UNet per image size), cached "
        "in $LCMKIT_OPENVINO_CACHE or ~/.cache/lcmkit/openvino; needs lcmkit[openvino]. --fast supersedes it")  # fmt: skip
    add("--fast", action="store_true",
        help="fast mode: the text encoder, UNet and VAE decoder on OpenVINO on the CPU at the precision this CPU "
        "runs fastest (bf16 with avx512_bf16/AMX, int8 weights with VNNI, else fp32; with VNNI/AMX also an int8 "
        "UNet and decoder where a one-time trial finds them faster and within 35 dB of exact mode), compiled for "
        "the image size and cached in $LCMKIT_OPENVINO_CACHE or ~/.cache/lcmkit/openvino; needs lcmkit[openvino]")  # fmt: skip
    add("--fast-precision", choices=FAST_PRECISIONS, default="auto",
        help="with --fast: auto chooses from the CPU's flags (and the int8 trial); bf16 skips the trial; int8 "
        "forces the int8 UNet and decoder without it")  # fmt: skip
    gen = argparse.ArgumentParser(add_help=False)
    add = gen.add_argument
    add("--steps", type=_arg(parse_int, "--steps", 1), default=4, help="denoising steps")
    add("--guidance", type=_arg(parse_float, "--guidance"), default=8.5, help="guidance scale")
    add("--preset", choices=preset_names(), metavar="NAME", help="sampler preset for a few-step model or LoRA; "
        "sets the scheduler, steps, guidance and timesteps (--steps/--guidance other than their defaults win): "
        + ", ".join(preset_names()))  # fmt: skip
    add("--seed", type=_arg(parse_seed), default=None,
        help="default (or -1): random; image i uses seed+i; printed next to each image's path")  # fmt: skip
    add(
        "--size", type=_arg(parse_size), metavar="WxH", help="multiples of 8; default: the model's or image's"
    )
    add("-n", type=_arg(parse_int, "-n", 1), default=1, help="images per prompt")
    add("--negative", default="", help="negative prompt (only for pipelines that take one)")
    add(
        "--out", default="out", help="output folder, created if missing; existing files are never overwritten"
    )
    add("--quiet", action="store_true",
        help="no progress bars, notes or warnings on stderr (errors still print); stdout still lists the images")  # fmt: skip
    control = argparse.ArgumentParser(add_help=False)
    control.add_argument("--control", action="append", default=[], type=_arg(parse_control),
        metavar="KIND=IMAGE[,scale=S][,start=A][,end=B]",
        help="steer with a ControlNet of KIND (canny: edges computed from IMAGE; depth, pose, normal, lineart, "
        "scribble, seg, ...: IMAGE used as it is), at weight S (1) from fraction A (0) to B (1) of the steps; "
        "repeatable, one ControlNet each; exact mode only")  # fmt: skip
    control.add_argument("--controlnet", action="append", default=[], type=_arg(parse_controlnet),
        metavar="KIND=PATH_OR_ID",
        help="the ControlNet model for KIND: a diffusers folder, an original .safetensors/.pth file or a hub id "
        "(default: lllyasviel's control_v11 SD1.5 model of that kind, from the hub)")  # fmt: skip
    batch = argparse.ArgumentParser(add_help=False)
    add = batch.add_argument
    add("--strength", type=_arg(parse_float, "--strength", 0.0, 1.0), default=0.8,
        help="img2img: how much of the image to re-noise, in (0, 1]")  # fmt: skip
    add("--prompts", type=Path, metavar="FILE",
        help="batch: one prompt per line (# comments), or a .jsonl file of objects with keys prompt, "
        "negative_prompt, steps, guidance, seed, size or width/height, n, strength, image (relative to "
        "the file's folder); keys override the options")  # fmt: skip
    add("--keep-going", action="store_true",
        help="batch: when a line fails, go on with the others and list the failures at the end (exit status 1); "
        "without it the batch stops at the first failure, naming its file:line")  # fmt: skip

    ipa = argparse.ArgumentParser(add_help=False)
    ipa.add_argument("--ip-adapter", type=_arg(parse_ip_adapter), metavar="PATH[:SCALE]",
                     help="an IP-Adapter (SD 1.5 layout: ip-adapter_sd15 or ip-adapter-plus_sd15) file, with its "
                     "image_encoder/ folder beside it, or a folder holding both; scale 1 by default. Needs "
                     "--ip-image, and exact mode (not --fast / --openvino)")  # fmt: skip
    ipa.add_argument("--ip-image", type=Path, metavar="IMAGE",
                     help="the image prompt the --ip-adapter reads (every prompt of a batch uses it)")  # fmt: skip

    parser = _Parser(prog="lcmkit", description="Latent Consistency Model image generation in a few steps",
                     formatter_class=_HelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = [common, model, where, pipe, gen, control, batch, ipa]
    p = sub.add_parser("generate", parents=run, formatter_class=_HelpFormatter, help="text to image")
    p.add_argument("prompt", nargs="?", help="the prompt (leave out with --prompts)")
    p = sub.add_parser("img2img", parents=run, formatter_class=_HelpFormatter, help="image to image")
    p.add_argument("image", type=Path, help="the input image (also the default image of a --prompts batch)")
    p.add_argument("prompt", nargs="?", help="the prompt (leave out with --prompts)")
    p = sub.add_parser("demo", parents=[common, where, gen], formatter_class=_HelpFormatter,
                       help="offline smoke run on a tiny RANDOM model (noise)")  # fmt: skip
    p.set_defaults(prompts=None, strength=0.8, keep_going=False)
    p = sub.add_parser("serve", parents=[common, model, where, pipe], formatter_class=_HelpFormatter,
                       help="the HTTP server and web page",
                       description="Serve the OpenAI images API, the AUTOMATIC1111 API and a web page. The model "
                       "options are the ones `generate` takes; the model loads in the background while /health "
                       "answers, and a bad model option fails before the server listens.")  # fmt: skip
    p.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on; the default is this machine only"
    )
    p.add_argument(
        "--port", type=_arg(parse_int, "--port", 1, 65535), default=7860, help="the port to listen on"
    )
    p.add_argument("--controlnet", dest="serve_controlnet", action="append", default=[],
                   type=_arg(parse_controlnet), metavar="KIND=PATH_OR_ID",
                   help="load a ControlNet for the A1111 routes' alwayson_scripts.controlnet units and the page's "
                   "control image (a diffusers folder, an original .safetensors/.pth file or a hub id); repeatable. "
                   "Loaded and checked against the UNet before the server listens; exact mode only")  # fmt: skip
    p.add_argument("--api-key", default=None, help="require this key; default: $LCMKIT_API_KEY if set")
    p.add_argument("--limit", action="append", default=[], type=_arg(parse_limit), metavar="NAME=VALUE",
                   help="a server limit such as max_steps=8; repeatable")  # fmt: skip
    p.add_argument("--unsupported", choices=("refuse", "warn"), default="refuse",
                   help="request settings the server cannot honour (A1111 hires fix, OpenAI style, unknown "
                   "fields...): refuse them with 400, or run without them and list them in the reply's warnings")  # fmt: skip
    distributed_cli.add_serve_arguments(p, _arg)
    add_distill_parser(sub, common)
    distributed_cli.add_batch_parser(sub, [common, model, where, pipe], _HelpFormatter, _arg)
    return parser


def add_distill_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("distill", parents=[common], formatter_class=_HelpFormatter,
                       help="distil a Stable Diffusion teacher into an LCM or LCM-LoRA",
                       description="Latent consistency distillation. Without --lora-rank: a full LCM pipeline "
                       "folder at --out. With it: an LCM-LoRA, --out/pytorch_lora_weights.safetensors. Checkpoints "
                       "and the loss log go to --out/train.")  # fmt: skip
    add = p.add_argument
    add("--teacher", required=True, metavar="DIR", help="a diffusers Stable Diffusion folder")
    add("--out", required=True, metavar="DIR", help="output folder; must be new or empty unless --resume")
    add("--data", metavar="FOLDER_OR_JSONL",
        help="images with same-named .txt captions, or a .jsonl file; default: the built-in synthetic world")  # fmt: skip
    add("--steps", type=_arg(parse_int, "--steps", 1), default=1000, metavar="N", help="training steps")
    add(
        "--batch-size",
        type=_arg(parse_int, "--batch-size", 1),
        default=8,
        metavar="N",
        help="images per step",
    )
    add("--lr", type=_arg(parse_float, "--lr", 0.0, 1.0), default=1e-4, metavar="X", help="learning rate")
    add("--w-min", type=_arg(parse_float, "--w-min"), default=5.0, metavar="W",
        help="guidance scale range, paper form w = guidance_scale - 1")  # fmt: skip
    add(
        "--w-max", type=_arg(parse_float, "--w-max"), default=15.0, metavar="W", help="upper end of the range"
    )
    add("--noise-offset", type=_arg(parse_float, "--noise-offset"), default=0.0, metavar="X",
        help="offset noise in the forward process, as the teacher was trained with (0: none, as for "
        "Stable Diffusion; lcmkit's tiny teacher: 0.2)")  # fmt: skip
    add("--num-ddim-timesteps", type=_arg(parse_int, "--num-ddim-timesteps", 1, 1000), default=50, metavar="N",
        help="solver grid, the LCM scheduler's original_inference_steps")  # fmt: skip
    add("--lora-rank", type=_arg(parse_int, "--lora-rank", 1), default=None, metavar="R",
        help="train an LCM-LoRA of this rank (64 in the LCM-LoRA paper) instead of a full LCM")  # fmt: skip
    add("--lora-alpha", type=_arg(parse_float, "--lora-alpha", 0.0, 1e6), default=None, metavar="A",
        help="LoRA scale is alpha / rank (default alpha: the rank)")  # fmt: skip
    add("--lora-targets", default=None, metavar="PRESET_OR_NAMES",
        help="lcm (the default: attention, feed-forward, resnet convs, resamplers, time projections), attention "
        "(to_q,to_k,to_v,to_out.0) or comma-separated module-name suffixes")  # fmt: skip
    add("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    add("--seed", type=_arg(parse_int, "--seed", 0), default=0, metavar="N", help="random seed of the run")
    add("--mixed-precision", choices=("no", "fp16", "bf16"), default="no", help="no: float32")
    add("--checkpoint-every", type=_arg(parse_int, "--checkpoint-every", 1), default=500, metavar="N",
        help="steps between checkpoints; the last step always saves one")  # fmt: skip
    add("--quiet", action="store_true", help="no progress bar")


# Requests --------------------------------------------------------------------------------------------------


def base_request(args: argparse.Namespace, prompt: str) -> GenerationRequest:
    width, height = args.size or (None, None)
    steps, guidance = args.steps, args.guidance
    if args.preset:
        steps, guidance = chosen_values(args.preset, steps, guidance)
    return GenerationRequest(prompt=prompt, negative_prompt=args.negative, steps=steps,
                             guidance_scale=guidance, seed=args.seed, width=width, height=height,
                             num_images=args.n, strength=args.strength,
                             extra={**({"preset": args.preset} if args.preset else {}),
                                    **getattr(args, "control_kwargs", {})})  # fmt: skip


def json_item(line: str, args: argparse.Namespace, image: Path | None, folder: Path) -> Item:
    """One JSONL line: its keys override the command-line options for this prompt only."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError('each line must be a JSON object such as {"prompt": "a cat"}')
    unknown, allowed = sorted(set(obj) - {*OPTION_KEYS, "image"}), [*OPTION_KEYS, "image"]
    if unknown or "prompt" not in obj:
        raise ValueError(f"unknown key(s) {unknown}; allowed: {allowed}" if unknown else 'no "prompt" key')
    if "image" in obj:
        if not isinstance(obj["image"], str):
            raise ValueError('"image" must be a path string')
        image = folder / Path(obj.pop("image")).expanduser()
    return Item(apply_options(base_request(args, ""), obj), image)


def read_prompts(path: Path, args: argparse.Namespace, image: Path | None) -> list[Item]:
    """Parse and check the whole batch before any model loads, so a typo on line 90 costs nothing."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read --prompts file {path}: {getattr(e, 'strerror', None) or e}") from e
    jsonl = path.suffix.lower() in JSONL_SUFFIXES
    items = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or (not jsonl and line.startswith("#")):
            continue
        try:
            item = (
                json_item(line, args, image, path.parent) if jsonl else Item(base_request(args, line), image)
            )
            items.append(_checked(replace(item, where=f"{path}:{lineno}")))
        except ValueError as e:
            raise CliError(f"{path}:{lineno}: {e}") from e
    if not items:
        raise CliError(f"--prompts file {path} has no prompts")
    return items


def _checked(item: Item) -> Item:
    """The item with its seed decided (`resolve_seeds`, so it can be printed and reused) and its image found."""
    req = item.request
    item.request = replace(req, seed=resolve_seeds(req.seed, req.num_images)[0])
    if item.image is not None and not item.image.is_file():
        raise ValueError(f"input image not found: {item.image}")
    return item


def collect_items(args: argparse.Namespace) -> list[Item]:
    image = getattr(args, "image", None)
    if args.prompts is not None:
        if args.prompt is not None:
            raise CliError("give either a PROMPT or --prompts FILE, not both")
        return read_prompts(args.prompts, args, image)
    if not args.prompt:
        raise CliError("no prompt: give a PROMPT, or --prompts FILE for a batch")
    try:
        return [_checked(Item(base_request(args, args.prompt), image))]
    except ValueError as e:
        raise CliError(str(e)) from None


def with_ip_image(items: list[Item], args: argparse.Namespace) -> list[Item]:
    """--ip-image read now (before the model loads) and given to every request; it needs --ip-adapter and the
    adapter needs it."""
    if args.ip_image is None:
        if args.ip_adapter is not None:
            raise CliError("--ip-adapter needs --ip-image IMAGE (the image prompt)")
        return items
    if args.ip_adapter is None:
        raise CliError("--ip-image needs --ip-adapter PATH (the adapter that reads it)")
    if not args.ip_image.is_file():
        raise CliError(f"--ip-image {args.ip_image}: no such file")
    image = load_image(args.ip_image, (None, None))
    return [
        replace(item, request=replace(item.request, extra={**item.request.extra, "ip_adapter_image": image}))
        for item in items
    ]


def check_out(text: str) -> Path:
    """--out as a folder that can be written, checked before any model loads. Nothing is created here: a folder
    that does not exist yet is made when the first image is saved."""
    out = Path(text).expanduser()
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {text}: is a file, not a folder; pass a folder (it is created if missing)")
    nearest = out
    while not nearest.exists():  # the folder that exists now, under which --out would be made
        if nearest.is_symlink():
            raise CliError(f"--out {text}: {nearest} is a link to nothing; pass another folder")
        nearest = nearest.parent
    if not nearest.is_dir():
        raise CliError(f"--out {text}: {nearest} is a file, so no folder can be made under it; pass a folder")
    try:
        if not os.access(nearest, os.W_OK | os.X_OK):
            raise PermissionError("permission denied")
        with tempfile.TemporaryFile(dir=nearest):  # also catches read-only file systems, and root's limits
            pass
    except OSError as e:
        reason = e.strerror or str(e)
        raise CliError(
            f"--out {text}: cannot write in {nearest} ({reason}); pass a folder you can write to"
        ) from None
    return out


def load_image(path: Path, size: tuple[int | None, int | None]) -> PIL.Image.Image:
    from lcmkit.io.png import read_image

    try:
        return read_image(path, size)
    except ValueError as e:
        raise CliError(str(e)) from e


# Model -----------------------------------------------------------------------------------------------------


def control_units(args: argparse.Namespace) -> list[Any]:
    """Each --control as a `lcmkit.control.ControlUnit` with its model (its --controlnet, else the kind's hub id)
    and its image read now, before any model loads: a missing or unreadable image is one error line at once."""
    controls = getattr(args, "control", [])
    chosen = dict(getattr(args, "controlnet", []))
    unused = sorted(set(chosen) - {c.kind for c in controls})
    if unused:
        raise CliError(f"--controlnet {unused[0]}=...: no --control {unused[0]}=IMAGE uses it")
    if not controls:
        return []
    from lcmkit.control import ControlUnit

    units = []
    for c in controls:
        if not c.image.is_file():
            raise CliError(f"--control {c.kind}: image not found: {c.image}")
        image = load_image(c.image, (None, None))
        units.append(ControlUnit(c.kind, image, **dict(c.settings), model=chosen.get(c.kind)))
    return units


def model_spec(args: argparse.Namespace) -> ModelSpec:
    """The model options as a `ModelSpec` (the one `lcmkit serve` builds too); mistakes are `SpecError`s."""
    return ModelSpec(
        controlnets=tuple((u.kind, u.source) for u in getattr(args, "control_units", []))
        or tuple(getattr(args, "serve_controlnet", ())),
        model=args.model,
        loras=tuple(args.lora),
        tiny_vae=args.tiny_vae,
        freeu=args.freeu,
        ip_adapter=getattr(args, "ip_adapter", None),
        vae_tiling=args.vae_tiling,
        openvino=args.openvino,
        fast=args.fast,
        fast_precision=args.fast_precision,
        fast_size=_fast_size(args),
        device=args.device,
        dtype=args.dtype,
    )


def _fast_size(args: argparse.Namespace) -> tuple[int, int] | None:
    """The size `--fast` compiles first: `--size` when the command has it and both sides are given."""
    size = getattr(args, "size", None)
    return tuple(size) if size and all(size) else None


def _quiet_libraries(debug: bool) -> None:
    """transformers has its own bars (weight loading) and import-time notes about backends we do not use."""
    import transformers

    transformers.logging.disable_progress_bar()
    if not debug:
        transformers.logging.set_verbosity_error()


def load(spec: ModelSpec, args: argparse.Namespace) -> tuple[Any, str]:
    """`load_pipeline(spec)` with the CLI's output settings. A hub id is looked up first, before torch and
    transformers are imported, so a machine without network fails within a second or two."""
    check_runtime(spec)
    spec = fetch(spec)
    _quiet_libraries(args.debug)
    pipe, name = load_pipeline(spec)
    pipe.set_progress_bar_config(disable=args.quiet, leave=False)
    return pipe, name


# Output ----------------------------------------------------------------------------------------------------


def slug(prompt: str, limit: int = 48) -> str:
    text = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return text[:limit].rstrip("-") or "lcm"


def run_item(pipe: Any, model_name: str, item: Item, out: Path) -> list[Path]:
    """Generate one item's images and save them; prints `PATH<TAB>seed N` for each as soon as it is written."""
    from tqdm import tqdm

    from lcmkit.io.png import save_png
    from lcmkit.request import run_request

    req = item.request
    if item.image is not None:
        req = replace(req, init_image=load_image(item.image, (req.width, req.height)))
    paths = []
    for result in run_request(pipe, req, model_name=model_name):
        path = save_png(result.image, out, slug(req.prompt), result.infotext)
        tqdm.write(f"{path}\tseed {result.seed}", file=sys.stdout)
        paths.append(path)
    return paths


def run_items(
    pipe: Any, model_name: str, items: list[Item], args: argparse.Namespace, out: Path
) -> list[Path]:
    """Run every item. A failing --prompts line is named by file:line; with --keep-going the others still run
    and `BatchFailed` lists the failures at the end. Images already written stay either way."""
    from tqdm import tqdm

    paths: list[Path] = []
    failures: list[str] = []
    bar = tqdm(items, desc="batch", unit="prompt", disable=args.quiet or args.prompts is None)
    for done, item in enumerate(bar):
        try:
            paths += run_item(pipe, model_name, item, out)
        except Exception as e:
            if item.where is None:
                raise
            if args.debug:
                traceback.print_exc()
            message = f"{item.where}: {_one_line(e)}"
            if not args.keep_going:
                raise BatchError(
                    f"{message} (stopped there: {done} of {len(items)} prompts done; --keep-going runs the rest)"
                ) from e
            failures.append(message)
            tqdm.write(f"lcmkit: error: {message} (going on: --keep-going)", file=sys.stderr)
    if failures:
        raise BatchFailed(failures, len(items))
    return paths


# Commands --------------------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    # every input mistake before the model loads: they cost nothing then
    from lcmkit.control import control_call_kwargs

    out = check_out(args.out)
    args.control_units = control_units(args)
    spec = model_spec(args)
    args.control_kwargs = control_call_kwargs(args.control_units)
    items = with_ip_image(collect_items(args), args)
    pipe, name = load(spec, args)
    run_items(pipe, name, items, args, out)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lcmkit.tiny import build_tiny_lcm

    out = check_out(args.out)
    try:
        items = [_checked(Item(base_request(args, DEMO_PROMPT)))]
    except ValueError as e:
        raise CliError(str(e)) from None
    folder = out / "tiny-lcm"
    _quiet_libraries(args.debug)
    if not (folder / "model_index.json").is_file():
        build_tiny_lcm(folder)
    if not args.quiet:
        note = "has RANDOM weights, so the image is NOISE; it only shows that the pipeline runs. Use --model for real ones"
        print(f"lcmkit: demo: {folder} {note}", file=sys.stderr)
    spec = ModelSpec(model=str(folder), device=args.device, dtype=args.dtype, name="tiny-random-noise")
    pipe, name = load(spec, args)
    run_items(pipe, name, items, args, out)
    return 0


def server_options(args: argparse.Namespace) -> dict[str, Any]:
    """`Settings` fields for `lcmkit.server.serve` from the serve options (--limit NAME=VALUE, ...), checked here
    so that a wrong one is a usage error (exit status 2) like every other."""
    from dataclasses import fields

    from lcmkit.server.jobs import Settings  # no web framework behind this import

    options = dict(args.limit)
    allowed = sorted(
        {f.name for f in fields(Settings)}
        - {"api_key", "model_name", "vae_name", "unsupported", "controlnets"}
    )
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise CliError(f"--limit {unknown[0]}: not a server limit; allowed: {', '.join(allowed)}")
    options["unsupported"] = getattr(args, "unsupported", "refuse")
    try:
        Settings(**options)
    except ValueError as e:
        raise CliError(f"--limit: {e}") from None
    return options


def cmd_serve(args: argparse.Namespace) -> int:
    from lcmkit import server  # its lazy `serve` turns a missing fastapi/uvicorn into one clear ImportError

    if not args.ray and (args.replicas != 1 or args.address):
        raise CliError("--replicas and --address serve on Ray: add --ray")
    spec = model_spec(args)
    options = server_options(args)
    check_runtime(spec)
    key = args.api_key or os.environ.get("LCMKIT_API_KEY") or None
    _quiet_libraries(args.debug)
    if args.ray:
        return distributed_cli.cmd_serve_ray(args, spec, options, key)
    server.serve(spec, host=args.host, port=args.port, api_key=key, **options)
    return 0


def check_distill_args(args: argparse.Namespace) -> tuple[Path, Path]:
    """Every input mistake before torch loads: (teacher folder, output folder)."""
    teacher = Path(args.teacher).expanduser()
    if not teacher.is_dir():
        raise CliError(f"--teacher {args.teacher}: no such folder (pass a diffusers Stable Diffusion folder)")
    if not (teacher / "model_index.json").is_file():
        raise CliError(
            f"--teacher {args.teacher}: not a diffusers pipeline folder (it has no model_index.json)"
        )
    if args.data is not None:
        data = Path(args.data).expanduser()
        if not data.exists():
            raise CliError(f"--data {args.data}: no such folder or file")
        if data.is_file() and data.suffix != ".jsonl":
            raise CliError(f"--data {args.data}: pass a folder of images with .txt captions or a .jsonl file")
    if not 0 <= args.w_min <= args.w_max:
        raise CliError(f"need 0 <= --w-min <= --w-max, got --w-min {args.w_min:g} --w-max {args.w_max:g}")
    if not 0 <= args.noise_offset <= 1:
        raise CliError(f"--noise-offset must be between 0 and 1, got {args.noise_offset:g}")
    if args.lora_rank is None and (args.lora_alpha is not None or args.lora_targets is not None):
        raise CliError("--lora-alpha and --lora-targets apply to an LCM-LoRA: add --lora-rank R")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {args.out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()):
        if not args.resume:
            raise CliError(
                f"--out {args.out} exists and is not empty; pass --resume to continue the run in it, "
                "or choose a new folder"
            )
        from lcmkit.train.loop import latest_checkpoint

        if latest_checkpoint(out / "train") is None:
            raise CliError(f"--resume: {out / 'train'} has no checkpoint to continue from")
    return teacher, out


def cmd_distill(args: argparse.Namespace) -> int:
    teacher, out = check_distill_args(args)
    _quiet_libraries(args.debug)
    from lcmkit.train.distill import DistillConfig, distill
    from lcmkit.train.distill_lora import LORA_WEIGHT_NAME, resolve_targets
    from lcmkit.train.loop import LoopConfig

    lora = {}
    if args.lora_rank is not None:
        try:
            targets = resolve_targets(args.lora_targets or "lcm")
        except ValueError as e:
            raise CliError(f"--lora-targets: {e}") from None
        lora = {"lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha, "lora_targets": targets}
    loop = LoopConfig(output_dir=out / "train", max_steps=args.steps, batch_size=args.batch_size,
                      learning_rate=args.lr, checkpoint_every=args.checkpoint_every, seed=args.seed,
                      resume=args.resume, progress=not args.quiet)  # fmt: skip
    data = None if args.data is None else str(Path(args.data).expanduser())
    config = DistillConfig(teacher=teacher, save_dir=out, data=data, num_ddim_timesteps=args.num_ddim_timesteps,
                           w_min=args.w_min, w_max=args.w_max, noise_offset=args.noise_offset,
                           mixed_precision=args.mixed_precision, loop=loop, **lora)  # fmt: skip
    result = distill(config)
    print(result / LORA_WEIGHT_NAME if lora else result)
    return 0


COMMANDS = {
    "generate": cmd_generate,
    "img2img": cmd_generate,
    "demo": cmd_demo,
    "serve": cmd_serve,
    "distill": cmd_distill,
    "batch": lambda args: distributed_cli.cmd_batch(args, model_spec(args)),
}


def _one_line(e: BaseException) -> str:
    """The message on one line; the exception's type too where the message alone would not say what broke."""
    text = " ".join(str(e).split())
    if isinstance(e, CliError | ValueError | OSError | ImportError) and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextlib.contextmanager
def _output_settings(args: argparse.Namespace) -> Iterator[None]:
    """Logging for one run: warnings on stderr, lcmkit's debug logs with --debug, and with --quiet nothing below
    an error, from lcmkit, transformers, huggingface_hub, torch or Python's warnings module. Levels and filters
    are put back afterwards, so `main` can run in one process many times (the tests do)."""
    import huggingface_hub.utils.logging  # noqa: F401  (configures its logger now: the level below then holds)
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = getattr(args, "quiet", False) and not args.debug
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = ("", "lcmkit", "transformers", "huggingface_hub", "torch", "py.warnings")
    saved = {name: logging.getLogger(name).level for name in names}
    bars_were_off = are_progress_bars_disabled()
    with warnings.catch_warnings():
        if args.debug:
            logging.getLogger("lcmkit").setLevel(logging.DEBUG)
        if quiet:
            for name in names:
                logging.getLogger(name).setLevel(logging.ERROR)
            warnings.simplefilter("ignore")
            disable_progress_bars()
        try:
            yield
        finally:
            for name, level in saved.items():
                logging.getLogger(name).setLevel(level)
            if quiet and not bars_were_off:
                enable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok; 2 bad input, found before any model loads; 1 other failures,
    including --prompts lines that failed while running; 130 interrupted)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return e.code if isinstance(e.code, int) else 0
    with _output_settings(args):
        try:
            return COMMANDS[args.command](args)
        except KeyboardInterrupt:
            print("lcmkit: interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            if args.debug and not isinstance(
                e, BatchError
            ):  # a batch line's traceback was printed when it failed
                traceback.print_exc()
            text = str(e) if isinstance(e, BatchFailed) else _one_line(e)
            print(f"lcmkit: error: {text}", file=sys.stderr)
            if isinstance(e, CliError):
                return e.exit_code
            return 2 if isinstance(e, SpecError) else 1
