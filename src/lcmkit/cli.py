"""The `lcmkit` command line: `generate`, `img2img`, `demo`, `serve` and `distill`.

Thin on purpose: arguments (or the lines of a prompts file) become `GenerationRequest`s and `run_request` does the
work, as it does for the HTTP server, so a PNG made here carries the same AUTOMATIC1111 infotext as one made there.
`distill` likewise only fills a `DistillConfig` for `lcmkit.train.distill.distill`.
Heavy imports (torch, the pipelines) wait until a command needs them, so usage errors come back at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from lcmkit.request import (
    OPTION_KEYS,
    GenerationRequest,
    apply_options,
    parse_float,
    parse_int,
    parse_seed,
    parse_size,
)

if TYPE_CHECKING:
    import PIL.Image

DEFAULT_MODEL = Path(__file__).resolve().parent / "assets" / "tiny-lcm"
"""Where the trained tiny model ships; used when `--model` is not given, once this folder exists."""
FREEU_SD15 = (0.9, 0.2, 1.5, 1.6)  # s1, s2, b1, b2 recommended for SD1.5 by the FreeU authors
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# lcmkit.accel.per_shape.DATA_FREE_PRECISIONS, named here so that the parser does not import torch
OPENVINO_PRECISIONS = ("fp32", "int8-weights")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
DEMO_PROMPT = "a red circle on a blue background"

Item = tuple[GenerationRequest, "Path | None"]  # a request and the path of its init image, loaded when run


class CliError(Exception):
    """A mistake in what the user typed or pointed at: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line instead of argparse's usage block, in the same `lcmkit: error:` form as every other error."""
        print(f"lcmkit: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


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
    model.add_argument("--model", help="a diffusers folder, a .safetensors/.ckpt file or a hub id owner/name")
    pipe = argparse.ArgumentParser(add_help=False)
    add = pipe.add_argument
    add("--lora", action="append", default=[], type=_arg(parse_lora), metavar="PATH[:WEIGHT]",
        help="load a LoRA (file or hub id), weight 1 by default; repeatable")  # fmt: skip
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
        "in $LCMKIT_OPENVINO_CACHE or ~/.cache/lcmkit/openvino; needs lcmkit[openvino]")  # fmt: skip
    gen = argparse.ArgumentParser(add_help=False)
    add = gen.add_argument
    add("--steps", type=_arg(parse_int, "--steps", 1), default=4, help="denoising steps (default 4)")
    add("--guidance", type=_arg(parse_float, "--guidance"), default=8.5, help="guidance scale (default 8.5)")
    add("--seed", type=_arg(parse_seed), default=None, help="default (or -1): random; image i uses seed+i")
    add(
        "--size", type=_arg(parse_size), metavar="WxH", help="multiples of 8; default: the model's or image's"
    )
    add("-n", type=_arg(parse_int, "-n", 1), default=1, help="images per prompt")
    add("--negative", default="", help="negative prompt (only for pipelines that take one)")
    add("--out", default="out", help="output folder; existing files are never overwritten")
    add("--quiet", action="store_true", help="no progress bars")
    batch = argparse.ArgumentParser(add_help=False)
    add = batch.add_argument
    add("--strength", type=_arg(parse_float, "--strength", 0.0, 1.0), default=0.8,
        help="img2img: how much of the image to re-noise, in (0, 1]")  # fmt: skip
    add("--prompts", type=Path, metavar="FILE",
        help="batch: one prompt per line (# comments), or a .jsonl file of objects with keys prompt, "
        "negative_prompt, steps, guidance, seed, size or width/height, n, strength, image (relative to "
        "the file's folder); keys override the options")  # fmt: skip

    parser = _Parser(prog="lcmkit", description="Latent Consistency Model image generation in a few steps")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("generate", parents=[common, model, pipe, gen, batch], help="text to image")
    p.add_argument("prompt", nargs="?", help="the prompt (leave out with --prompts)")
    p = sub.add_parser("img2img", parents=[common, model, pipe, gen, batch], help="image to image")
    p.add_argument("image", type=Path, help="the input image (also the default image of a --prompts batch)")
    p.add_argument("prompt", nargs="?", help="the prompt (leave out with --prompts)")
    p = sub.add_parser("demo", parents=[common, gen], help="offline smoke run on a tiny RANDOM model (noise)")
    p.set_defaults(
        model=None,
        lora=[],
        freeu=None,
        vae_tiling=False,
        tiny_vae=None,
        openvino=None,
        strength=0.8,
        prompts=None,
    )
    p = sub.add_parser("serve", parents=[common, model], help="the HTTP server and web page")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=_arg(parse_int, "--port", 1, 65535), default=7860)
    p.add_argument("--device", help="cuda, cpu, ...; default: the server's choice")
    p.add_argument(
        "--tiny-vae", metavar="FOLDER", help="fast mode: decode with a tiny VAE (AutoencoderTiny folder)"
    )
    p.add_argument("--openvino", choices=OPENVINO_PRECISIONS, metavar="PRECISION",
                   help="fast mode: the UNet and the VAE decoder (not a --tiny-vae) through OpenVINO (CPU "
                   "only): fp32 or int8-weights")  # fmt: skip
    p.add_argument("--api-key", default=None, help="require this key; default: $LCMKIT_API_KEY if set")
    p.add_argument("--limit", action="append", default=[], type=_arg(parse_limit), metavar="NAME=VALUE",
                   help="a server limit such as max_steps=8; repeatable")  # fmt: skip
    add_distill_parser(sub, common)
    return parser


def add_distill_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("distill", parents=[common], help="distil a Stable Diffusion teacher into an LCM or LCM-LoRA",
                       description="Latent consistency distillation. Without --lora-rank: a full LCM pipeline "
                       "folder at --out. With it: an LCM-LoRA, --out/pytorch_lora_weights.safetensors. Checkpoints "
                       "and the loss log go to --out/train.")  # fmt: skip
    add = p.add_argument
    add("--teacher", required=True, metavar="DIR", help="a diffusers Stable Diffusion folder")
    add("--out", required=True, metavar="DIR", help="output folder; must be new or empty unless --resume")
    add("--data", metavar="FOLDER_OR_JSONL",
        help="images with same-named .txt captions, or a .jsonl file; default: the built-in synthetic world")  # fmt: skip
    add("--steps", type=_arg(parse_int, "--steps", 1), default=1000, metavar="N", help="default 1000")
    add("--batch-size", type=_arg(parse_int, "--batch-size", 1), default=8, metavar="N", help="default 8")
    add("--lr", type=_arg(parse_float, "--lr", 0.0, 1.0), default=1e-4, metavar="X", help="default 1e-4")
    add("--w-min", type=_arg(parse_float, "--w-min"), default=5.0, metavar="W",
        help="guidance scale range, paper form w = guidance_scale - 1 (default 5)")  # fmt: skip
    add("--w-max", type=_arg(parse_float, "--w-max"), default=15.0, metavar="W", help="default 15")
    add("--noise-offset", type=_arg(parse_float, "--noise-offset"), default=0.0, metavar="X",
        help="offset noise in the forward process, as the teacher was trained with (default 0: none, as for "
        "Stable Diffusion; lcmkit's tiny teacher: 0.2)")  # fmt: skip
    add("--num-ddim-timesteps", type=_arg(parse_int, "--num-ddim-timesteps", 1, 1000), default=50, metavar="N",
        help="solver grid, the LCM scheduler's original_inference_steps (default 50)")  # fmt: skip
    add("--lora-rank", type=_arg(parse_int, "--lora-rank", 1), default=None, metavar="R",
        help="train an LCM-LoRA of this rank (64 in the LCM-LoRA paper) instead of a full LCM")  # fmt: skip
    add("--lora-alpha", type=_arg(parse_float, "--lora-alpha", 0.0, 1e6), default=None, metavar="A",
        help="LoRA scale is alpha / rank (default alpha: the rank)")  # fmt: skip
    add("--lora-targets", default=None, metavar="PRESET_OR_NAMES",
        help="lcm (default: attention, feed-forward, resnet convs, resamplers, time projections), attention "
        "(to_q,to_k,to_v,to_out.0) or comma-separated module-name suffixes")  # fmt: skip
    add("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    add("--seed", type=_arg(parse_int, "--seed", 0), default=0, metavar="N", help="default 0")
    add("--mixed-precision", choices=("no", "fp16", "bf16"), default="no", help="default no (float32)")
    add("--checkpoint-every", type=_arg(parse_int, "--checkpoint-every", 1), default=500, metavar="N",
        help="default 500; the last step always saves one")  # fmt: skip
    add("--quiet", action="store_true", help="no progress bar")


# Requests --------------------------------------------------------------------------------------------------


def base_request(args: argparse.Namespace, prompt: str) -> GenerationRequest:
    width, height = args.size or (None, None)
    return GenerationRequest(prompt=prompt, negative_prompt=args.negative, steps=args.steps,
                             guidance_scale=args.guidance, seed=args.seed, width=width, height=height,
                             num_images=args.n, strength=args.strength)  # fmt: skip


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
    return apply_options(base_request(args, ""), obj), image


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
            item = json_item(line, args, image, path.parent) if jsonl else (base_request(args, line), image)
            items.append(_check_image(item))
        except ValueError as e:
            raise CliError(f"{path}:{lineno}: {e}") from e
    if not items:
        raise CliError(f"--prompts file {path} has no prompts")
    return items


def _check_image(item: Item) -> Item:
    if item[1] is not None and not item[1].is_file():
        raise ValueError(f"input image not found: {item[1]}")
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
        return [_check_image((base_request(args, args.prompt), image))]
    except ValueError as e:
        raise CliError(str(e)) from None


def load_image(path: Path, size: tuple[int | None, int | None]) -> PIL.Image.Image:
    import PIL.Image

    try:
        with PIL.Image.open(path) as im:
            image = im.convert("RGB")
    except (OSError, PIL.Image.DecompressionBombError) as e:
        raise CliError(f"cannot read image {path}: {e}") from e
    if size[0] or size[1]:  # --size resizes the input; the pipeline keeps the input's size otherwise
        image = image.resize((size[0] or image.width, size[1] or image.height), PIL.Image.Resampling.LANCZOS)
    return image


# Model -----------------------------------------------------------------------------------------------------


def resolve_model(model: str | None) -> str:
    if model:
        return model
    if DEFAULT_MODEL.is_dir():
        return str(DEFAULT_MODEL)
    raise CliError(
        "no model: pass --model PATH_OR_HUB_ID (a diffusers folder, a .safetensors/.ckpt file or owner/name), "
        "or run `lcmkit demo` for an offline smoke test"
    )


def _quiet_transformers(debug: bool) -> None:
    """transformers has its own bars (weight loading) and import-time notes about backends we do not use."""
    import transformers

    transformers.logging.disable_progress_bar()
    if not debug:
        transformers.logging.set_verbosity_error()


def load_tiny_vae(folder: str, dtype: Any) -> Any:
    """An `AutoencoderTiny` folder (TAESD layout) to decode with, in the pipeline's dtype."""
    if not Path(folder).is_dir():
        raise CliError(f"--tiny-vae {folder}: not a folder (pass an AutoencoderTiny folder with config.json)")
    from lcmkit.models.tiny_vae import AutoencoderTiny

    return AutoencoderTiny.from_pretrained(folder, torch_dtype=dtype)


def load_pipeline(args: argparse.Namespace) -> tuple[Any, str]:
    """The pipeline with its LoRAs and switches applied, and the model name written into the infotext."""
    if args.openvino and args.freeu:
        raise CliError("--freeu cannot be combined with --openvino (FreeU's FFT does not convert); drop one")
    model = resolve_model(args.model)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise CliError(
            f"--model {model}: a model file must be a .safetensors or .ckpt single-file checkpoint"
        )
    if not path.exists() and (not HUB_ID.fullmatch(model) or model.lower().endswith(SINGLE_FILE_SUFFIXES)):
        raise CliError(f"--model {model}: no such folder or file, and not a hub id like owner/name")
    _quiet_transformers(args.debug)
    from lcmkit import LatentConsistencyModelPipeline

    if path.is_file():
        pipe, name = LatentConsistencyModelPipeline.from_single_file(str(path)), path.stem
    else:
        pipe = LatentConsistencyModelPipeline.from_pretrained(str(path) if path.exists() else model)
        name = path.name if path.exists() else model
    pipe.set_progress_bar_config(disable=args.quiet, leave=False)
    if args.tiny_vae:
        pipe.vae = load_tiny_vae(args.tiny_vae, pipe.dtype)
    if args.vae_tiling:
        pipe.enable_vae_tiling()
    if args.freeu:
        pipe.enable_freeu(*args.freeu)
    if args.lora:
        names = [f"lora{i}" for i in range(len(args.lora))]
        for adapter, (source, _) in zip(names, args.lora, strict=True):
            pipe.load_lora_weights(source, adapter_name=adapter)
        pipe.set_adapters(names, [weight for _, weight in args.lora])
    if args.openvino:
        install_openvino(pipe, args.openvino)
    return pipe, name


def install_openvino(pipe: Any, precision: str) -> None:
    """--openvino: the UNet (LoRAs baked in at their weights, so after they are set) and the full VAE's decoder
    through OpenVINO. A tiny VAE stays eager: it is already cheap, and it is not an AutoencoderKL."""
    try:
        from lcmkit.accel import use_openvino

        use_openvino(pipe, precision)
    except (ImportError, ValueError) as e:
        raise CliError(f"--openvino {precision}: {e}") from None


# Output ----------------------------------------------------------------------------------------------------


def slug(prompt: str, limit: int = 48) -> str:
    text = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return text[:limit].rstrip("-") or "lcm"


def save_png(image: PIL.Image.Image, folder: Path, stem: str, parameters: str) -> Path:
    """Write `stem-NNNN.png` with the first free NNNN. Exclusive create (`x`), so a file that exists, or that
    another process creates at the same moment, is never overwritten: we just take the next number."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)  # AUTOMATIC1111's key; tEXt (iTXt when not Latin-1)
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        path = folder / f"{stem}-{n:04d}.png"
        try:
            f = open(path, "xb")  # noqa: SIM115
        except FileExistsError:
            n += 1
            continue
        try:
            with f:
                image.save(f, format="PNG", pnginfo=info)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path


def run_items(pipe: Any, model_name: str, items: list[Item], args: argparse.Namespace) -> list[Path]:
    from tqdm import tqdm

    from lcmkit.request import run_request

    batch = args.prompts is not None
    paths = []
    for req, image in tqdm(items, desc="batch", unit="prompt", disable=args.quiet or not batch):
        if image is not None:
            req.init_image = load_image(image, (req.width, req.height))
        for result in run_request(pipe, req, model_name=model_name):
            path = save_png(result.image, Path(args.out), slug(req.prompt), result.infotext)
            tqdm.write(str(path), file=sys.stdout)
            paths.append(path)
        req.init_image = None  # let a long batch free each input image
    return paths


# Commands --------------------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    items = collect_items(args)  # before the model loads: input mistakes cost nothing
    pipe, name = load_pipeline(args)
    run_items(pipe, name, items, args)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lcmkit.tiny import build_tiny_lcm

    folder = Path(args.out) / "tiny-lcm"
    _quiet_transformers(args.debug)
    if not (folder / "model_index.json").is_file():
        build_tiny_lcm(folder)
    note = "has RANDOM weights, so the image is NOISE; it only shows that the pipeline runs. Use --model for real ones"
    print(f"lcmkit: demo: {folder} {note}", file=sys.stderr)
    args.model = str(folder)
    pipe, _ = load_pipeline(args)
    run_items(pipe, "tiny-random-noise", [(base_request(args, DEMO_PROMPT), None)], args)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from lcmkit import server  # its lazy `serve` turns a missing fastapi/uvicorn into one clear ImportError

    model = args.model or (str(DEFAULT_MODEL) if DEFAULT_MODEL.is_dir() else None)  # None: the server's demo
    key = args.api_key or os.environ.get("LCMKIT_API_KEY") or None
    server.serve(
        model,
        host=args.host,
        port=args.port,
        api_key=key,
        device=args.device,
        tiny_vae=args.tiny_vae,
        openvino=args.openvino,
        **dict(args.limit),
    )
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
    _quiet_transformers(args.debug)
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
}


def _one_line(e: BaseException) -> str:
    """The message on one line; the exception's type too where the message alone would not say what broke."""
    text = " ".join(str(e).split())
    if isinstance(e, CliError | ValueError | OSError | ImportError) and text:
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input, 1 other failures, 130 interrupted)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return e.code if isinstance(e.code, int) else 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.debug:
        logging.getLogger("lcmkit").setLevel(logging.DEBUG)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("lcmkit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        print(f"lcmkit: error: {_one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, CliError) else 1
