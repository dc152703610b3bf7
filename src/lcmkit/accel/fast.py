"""The fast mode, one call: `enable_fast(pipe)` runs the whole pipeline (text encoder, UNet, VAE decoder) on
OpenVINO at the precision this CPU runs fastest, with compiled graphs cached on disk.

What it does, in order:
1. picks the precision (`lcmkit.accel.cpu`): bf16 where the CPU has bf16 units, int8 weights where it has VNNI,
   else fp32; `precision=` overrides;
2. fuses the active LoRA adapters into the weights (the graphs bake them in; the cache key covers them);
3. converts each model once for the requested size (static shapes: OpenVINO picks its fastest kernels for them)
   and saves the IR in `cache_dir`, named by a sampled digest of the weights (see `GraphSource.sampled_key`),
   the config, the shapes and the LoRA state, so a later process neither converts nor reads all the weights again;
4. compiles each graph for this CPU from its IR file with OpenVINO's model cache on, so from a warm cache the
   compiled blob is imported instead of compiled (no stall on the first call), and installs the stand-ins;
5. with "auto" on a CPU with int8 dot products, swaps in an int8 UNet and/or VAE decoder for that size where the
   int8 trial (`lcmkit.accel.int8`, once per model, size and machine, its verdict cached) measured them faster
   and within 35 dB of exact mode; "int8" swaps both in without a trial.

Other sizes still work: the UNet and the decoder convert (or read from the cache) per new shape on first use.
What cannot change afterwards: the weights, LoRA scales, FreeU (refused), the device (CPU) and dtype (float32).
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lcmkit.accel.cpu import PrecisionRule, cpu_flags, has_int8_dot, resolve_precision
from lcmkit.accel.graphs import INSTALL_HINT, NEEDS_NNCF, check_threads, import_nncf, import_openvino
from lcmkit.accel.int8 import Int8Trial, Verdict
from lcmkit.accel.openvino import check_unet
from lcmkit.accel.per_shape import OpenVINOUNetPerShape, default_cache_dir
from lcmkit.accel.text_encoder import OpenVINOTextEncoder
from lcmkit.accel.vae_decoder import OpenVINOVAEDecoder
from lcmkit.models.vae import AutoencoderKL
from lcmkit.nn.lora import lora_layers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What one fast-mode precision runs every graph at (before any int8 trial): `weights` (the IR's weights) and
    `inference` (OpenVINO's arithmetic)."""

    weights: str
    inference: str


# bf16 arithmetic rounds the weights to 8 significant bits anyway, so storing them as float16 (11 bits) first changes
# little (only weights below float16's normal range, |w| < 6e-5, lose relative precision, and they add little) and
# halves the IR, its compiled blob, and the pages read at load. "int8" is "bf16" with both int8 graphs forced.
PLANS = {
    "fp32": Plan("fp32", "f32"),
    "bf16": Plan("fp16-weights", "bf16"),
    "int8-weights": Plan("int8-weights", "f32"),
    "int8": Plan("fp16-weights", "bf16"),
}


@dataclass
class FastMode:
    """What `enable_fast` installed: the precision and why, the cache folder, and the stand-ins."""

    precision: str
    reason: str
    cache_dir: Path
    unet: OpenVINOUNetPerShape
    unet_precision: str
    text_encoder: OpenVINOTextEncoder | None
    vae_decoder: OpenVINOVAEDecoder | None
    seconds: float
    vae_precision: str | None = None
    int8: Verdict | None = None  # the int8 trial's verdict (or the forced one), None where none ran

    def describe(self) -> str:
        parts = [
            f"unet ({self.unet_precision} at the first size)",
            *(["text encoder"] if self.text_encoder else []),
            *([f"vae decoder ({self.vae_precision} at the first size)"] if self.vae_decoder else []),
        ]
        trial = f"; {self.int8.describe()}" if self.int8 else ""
        return f"OpenVINO {self.precision} ({self.reason}): {', '.join(parts)}{trial}; ready in {self.seconds:.1f} s"


def _check_pipe(pipe: Any) -> None:
    if pipe.device.type != "cpu" or pipe.dtype != torch.float32:
        raise ValueError(
            f"the fast mode runs float32 on the CPU; this pipeline is {pipe.dtype} on {pipe.device}. "
            "Load it with torch_dtype=torch.float32 and leave it on the CPU"
        )
    check_unet(pipe.unet)  # also refuses FreeU and an already converted UNet


def _fuse_loras(pipe: Any) -> bool:
    """Fuse active, unfused adapters into the weights (so the graphs hold plain layers); True when any were."""
    layers = [layer for model in (pipe.unet, pipe.text_encoder) for _, layer in lora_layers(model)]
    if not any(layer.active and layer.enabled and not layer.fused for layer in layers):
        return False
    pipe.fuse_lora()
    return True


def enable_fast(
    pipe: Any,
    *,
    precision: str = "auto",
    cache_dir: str | Path | None = None,
    height: int | None = None,
    width: int | None = None,
    batch: int = 1,
    threads: int | None = None,
    flags: frozenset[str] | None = None,
) -> FastMode:
    """Put `pipe`'s text encoder, UNet and (full) VAE decoder on OpenVINO, compiled for `height` x `width` images
    made `batch` at a time (defaults: the model's size, 1), and return what was installed.

    `precision`: "auto" (from the CPU's flags, or `flags` when given: see `lcmkit.accel.cpu`; on a CPU with int8
    dot products it also runs the int8 trial of `lcmkit.accel.int8` once per model, size and machine), "fp32",
    "bf16", "int8-weights" or "int8" (the UNet and decoder int8 for this size without a trial). `cache_dir`
    (default `default_cache_dir()`) keeps the IR, compiled blobs and trial verdicts; a later call with the same
    weights, LoRA state, precision and size converts and measures nothing. `threads` caps OpenVINO's threads.
    A tiny VAE stays eager (it is already cheap). Active LoRA adapters are fused into the weights first
    (`pipe.unfuse_lora()` restores the eager weights; the stand-ins keep what was fused).
    """
    rule: PrecisionRule = resolve_precision(precision, flags)
    ov = import_openvino()  # a missing package fails here, before any work
    plan = PLANS[rule.precision]
    if plan.weights in NEEDS_NNCF or rule.precision == "int8":
        import_nncf()
    _check_pipe(pipe)
    check_threads(threads)
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    factor = pipe.vae_scale_factor
    height = height or pipe.unet.config.sample_size * factor
    width = width or pipe.unet.config.sample_size * factor
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    logger.info("fast mode: OpenVINO %s %s (%s)", rule.precision, ov.__version__, rule.why)
    started = time.perf_counter()
    if _fuse_loras(pipe):
        logger.info("fast mode: LoRA adapters fused into the weights before conversion")
    options = dict(precision=plan.weights, cache_dir=cache, threads=threads, sampled_key=True)
    inference = plan.inference
    tokens = pipe.tokenizer.model_max_length if pipe.tokenizer is not None else 77
    latent_shape = (batch, pipe.vae.config.latent_channels, height // factor, width // factor)

    trial = _int8_trial(
        pipe, precision, rule.precision, plan, flags, height, width, tokens, batch, cache, threads
    )
    verdict = trial.cached_verdict() if trial else None
    if trial and verdict is None:
        # said at warning level: the CLI shows warnings, and minutes of silence would look like a hang
        logger.warning(
            "fast mode: first use of this model at %dx%d on this machine: trying int8 for the UNet and the VAE "
            "decoder (an exact run, two quantizations, a timing: minutes at SD1.5 size, once; "
            "--fast-precision bf16 skips it)",
            width,
            height,
        )
        trial.reference()  # the exact pipeline's run, before any part is replaced
    text_encoder = None
    if pipe.text_encoder is not None:
        text_encoder = OpenVINOTextEncoder(pipe.text_encoder, tokens=tokens, inference=inference, **options)
        pipe.text_encoder = text_encoder
    unet = OpenVINOUNetPerShape(
        pipe.unet, vae_scale_factor=factor, batch_size=batch, inference=inference, **options
    )
    base_unet = (
        None if verdict and verdict.unet else unet.prepare(height // factor, width // factor, tokens, batch)
    )
    int8_unet = trial.build_unet() if trial and (verdict is None or verdict.unet) else None
    decoder = base_request = int8_request = None
    if isinstance(pipe.vae, AutoencoderKL):
        decoder = OpenVINOVAEDecoder(pipe.vae, inference=inference, **options)
        if not (verdict and verdict.vae):
            base_request = decoder.prepare(latent_shape)
        if trial and (verdict is None or verdict.vae):
            int8_request = trial.build_decoder()  # needs the eager decoder: before it is replaced
        pipe.vae.decoder = decoder
    pipe.unet = unet
    if trial and verdict is None:
        verdict = trial.judge(unet, base_unet, int8_unet, base_request, int8_request)
        logger.warning("fast mode: %s (saved in %s)", verdict.describe(), trial.path)
    if verdict and verdict.unet:
        unet.add(int8_unet)
    elif base_unet is not None:
        unet.add(base_unet)  # what the trial ran last may have been the int8 graph
    if decoder is not None and verdict and verdict.vae:
        decoder.add(latent_shape, int8_request)
    mode = FastMode(
        precision=rule.precision,
        reason=rule.why,
        cache_dir=cache,
        unet=unet,
        unet_precision="int8" if verdict and verdict.unet else plan.weights,
        text_encoder=text_encoder,
        vae_decoder=decoder,
        seconds=time.perf_counter() - started,
        vae_precision=None if decoder is None else "int8" if verdict and verdict.vae else plan.weights,
        int8=verdict,
    )
    logger.info("fast mode: %s", mode.describe())
    return mode


def _int8_trial(
    pipe: Any,
    asked: str,
    precision: str,
    plan: Plan,
    flags: frozenset[str] | None,
    height: int,
    width: int,
    tokens: int,
    batch: int,
    cache: Path,
    threads: int | None,
) -> Int8Trial | None:
    """The int8 trial where it applies: forced for "int8"; for "auto" on a CPU with int8 dot products and NNCF
    installed (without it, the base precision, said once in the log)."""
    have = cpu_flags() if flags is None else flags
    if precision != "int8" and not (asked == "auto" and has_int8_dot(have)):
        return None
    if precision != "int8" and importlib.util.find_spec("nncf") is None:
        logger.info("fast mode: this CPU has int8 dot products, but nncf is not installed: no int8 trial (%s)",
                    INSTALL_HINT)  # fmt: skip
        return None
    return Int8Trial(
        pipe,
        height=height,
        width=width,
        tokens=tokens,
        batch=batch,
        cache_dir=cache,
        threads=threads,
        inference=plan.inference,
        base=plan.weights,
        flags=have,
        forced=precision == "int8",
    )
