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
from lcmkit.accel.graphs import check_threads, import_nncf, import_openvino
from lcmkit.accel.openvino import check_unet
from lcmkit.accel.per_shape import OpenVINOUNetPerShape, default_cache_dir
from lcmkit.accel.text_encoder import OpenVINOTextEncoder
from lcmkit.accel.vae_decoder import OpenVINOVAEDecoder
from lcmkit.models.vae import AutoencoderKL
from lcmkit.nn.lora import lora_layers

logger = logging.getLogger(__name__)

WEIGHTS = {"fp32": "fp32", "bf16": "fp32", "int8-weights": "int8-weights"}  # the IR's weights per precision
INFERENCE = {"fp32": "f32", "bf16": "bf16", "int8-weights": "f32"}  # OpenVINO's arithmetic per precision


@dataclass
class FastMode:
    """What `enable_fast` installed: the precision and why, the cache folder, and the stand-ins."""

    precision: str
    reason: str
    cache_dir: Path
    unet: OpenVINOUNetPerShape
    text_encoder: OpenVINOTextEncoder | None
    vae_decoder: OpenVINOVAEDecoder | None
    seconds: float

    def describe(self) -> str:
        parts = [
            "unet",
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
    if WEIGHTS[rule.precision] != "fp32":
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
    options = dict(precision=WEIGHTS[rule.precision], cache_dir=cache, threads=threads, sampled_key=True)
    inference = INFERENCE[rule.precision]
    tokens = pipe.tokenizer.model_max_length if pipe.tokenizer is not None else 77

    text_encoder = None
    if pipe.text_encoder is not None:
        text_encoder = OpenVINOTextEncoder(pipe.text_encoder, tokens=tokens, inference=inference, **options)
        pipe.text_encoder = text_encoder
    unet = OpenVINOUNetPerShape(
        pipe.unet, vae_scale_factor=factor, batch_size=batch, inference=inference, **options
    )
    unet.prepare(height // factor, width // factor, tokens, batch)
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
        text_encoder=text_encoder,
        vae_decoder=decoder,
        seconds=time.perf_counter() - started,
    )
    logger.info("fast mode: %s", mode.describe())
    return mode
