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
   compiled blob is imported instead of compiled (no stall on the first call), and installs the stand-ins.

Other sizes still work: the UNet and the decoder convert (or read from the cache) per new shape on first use.
What cannot change afterwards: the weights, LoRA scales, FreeU (refused), the device (CPU) and dtype (float32).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lcmkit.accel.cpu import PrecisionRule, resolve_precision
from lcmkit.accel.graphs import NEEDS_NNCF, check_threads, import_nncf, import_openvino
from lcmkit.accel.openvino import LazyUNetInputs, UNetInputs, check_unet, collect_unet_inputs, openvino_unet
from lcmkit.accel.per_shape import OpenVINOUNetPerShape, default_cache_dir
from lcmkit.accel.text_encoder import OpenVINOTextEncoder
from lcmkit.accel.vae_decoder import OpenVINOVAEDecoder
from lcmkit.models.vae import AutoencoderKL
from lcmkit.nn.lora import lora_layers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What one fast-mode precision runs: `weights` (the IR's weights) and `inference` (OpenVINO's arithmetic) for
    the text encoder, the VAE decoder and UNet sizes met later; `unet` for the UNet at the size `enable_fast`
    compiles (calibrated there when it quantizes activations)."""

    weights: str
    inference: str
    unet: str


# bf16 arithmetic rounds the weights to 8 significant bits anyway, so storing them as float16 (11 bits) first changes
# little (only weights below float16's normal range, |w| < 6e-5, lose relative precision, and they add little) and
# halves the IR, its compiled blob, and the pages read at load.
PLANS = {
    "fp32": Plan("fp32", "f32", "fp32"),
    "bf16": Plan("fp16-weights", "bf16", "fp16-weights"),
    "int8-weights": Plan("int8-weights", "f32", "int8-weights"),
    "int8": Plan("fp16-weights", "bf16", "int8"),
}

# The int8 UNet's calibration recipe: these prompts, seeds 0.., the steps and guidance of a default call, at the
# compiled size. Data, part of the cache key: change it and the int8 graph is calibrated again.
CALIBRATION_PROMPTS = (
    "a photo of a cat sitting on a windowsill, soft light",
    "a landscape painting of mountains and a lake at sunset",
    "portrait of an old man, studio lighting, detailed",
    "a red sports car on a city street at night, neon",
)
CALIBRATION_STEPS, CALIBRATION_GUIDANCE = 4, 8.0


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

    def describe(self) -> str:
        parts = [
            f"unet ({self.unet_precision} at the first size)",
            *(["text encoder"] if self.text_encoder else []),
            *(["vae decoder"] if self.vae_decoder else []),
        ]
        return f"OpenVINO {self.precision} ({self.reason}): {', '.join(parts)}; ready in {self.seconds:.1f} s"


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

    `precision`: "auto" (from the CPU's flags, or `flags` when given: see `lcmkit.accel.cpu`), "fp32", "bf16" or
    "int8-weights". `cache_dir` (default `default_cache_dir()`) keeps the IR and compiled blobs; a later call with
    the same weights, LoRA state, precision and size converts nothing. `threads` caps OpenVINO's threads.
    A tiny VAE stays eager (it is already cheap). Active LoRA adapters are fused into the weights first
    (`pipe.unfuse_lora()` restores the eager weights; the stand-ins keep what was fused).
    """
    rule: PrecisionRule = resolve_precision(precision, flags)
    ov = import_openvino()  # a missing package fails here, before any work
    plan = PLANS[rule.precision]
    if plan.weights in NEEDS_NNCF or plan.unet in NEEDS_NNCF:
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

    text_encoder = None
    if pipe.text_encoder is not None:
        text_encoder = OpenVINOTextEncoder(pipe.text_encoder, tokens=tokens, inference=inference, **options)
        pipe.text_encoder = text_encoder
    unet = OpenVINOUNetPerShape(
        pipe.unet, vae_scale_factor=factor, batch_size=batch, inference=inference, **options
    )
    if plan.unet == plan.weights:
        unet.prepare(height // factor, width // factor, tokens, batch)
    else:
        unet.add(_calibrated_unet(pipe, plan, height, width, tokens, batch, cache, threads))
    pipe.unet = unet
    decoder = None
    if isinstance(pipe.vae, AutoencoderKL):
        decoder = OpenVINOVAEDecoder(pipe.vae, inference=inference, **options)
        decoder.prepare((batch, pipe.vae.config.latent_channels, height // factor, width // factor))
        pipe.vae.decoder = decoder
    mode = FastMode(
        precision=rule.precision,
        reason=rule.why,
        cache_dir=cache,
        unet=unet,
        unet_precision=plan.unet,
        text_encoder=text_encoder,
        vae_decoder=decoder,
        seconds=time.perf_counter() - started,
    )
    logger.info("fast mode: %s", mode.describe())
    return mode


def _calibrated_unet(
    pipe: Any, plan: Plan, height: int, width: int, tokens: int, batch: int, cache: Path, threads: int | None
) -> Any:
    """The UNet at `plan.unet` (activations quantized) for this size, calibrated on the UNet inputs of
    `CALIBRATION_PROMPTS` through this pipeline, recorded only when the graph is not in the cache yet."""
    recipe = (
        f"prompts={CALIBRATION_PROMPTS!r} seeds=0.. steps={CALIBRATION_STEPS} guidance={CALIBRATION_GUIDANCE} "
        f"size={height}x{width}"
    )

    def record() -> list[UNetInputs]:
        return collect_unet_inputs(
            pipe,
            CALIBRATION_PROMPTS,
            num_inference_steps=CALIBRATION_STEPS,
            guidance_scale=CALIBRATION_GUIDANCE,
            height=height,
            width=width,
        )

    return openvino_unet(
        pipe.unet,
        batch_size=batch,
        height=height,
        width=width,
        precision=plan.unet,
        calibration=LazyUNetInputs(recipe, record),
        cache_dir=cache,
        threads=threads,
        text_tokens=tokens,
        vae_scale_factor=pipe.vae_scale_factor,
        inference=plan.inference,
        sampled_key=True,
    )
