"""OpenVINO for the VAE decoder: `vae.decode` on a compiled graph, for the same image as eager.

Why: at 512x512 the SD decoder is about 40% of a 4-step LCM run on the CPU, and with the UNet already on OpenVINO
it is the larger share. In fp32 the compiled decoder computes what the eager one does up to rounding (a few 1e-6
on random weights), so an OpenVINO UNet plus this decoder is a faster mode that keeps the eager image, unlike a
tiny VAE.

How it differs from the UNet's per-shape stand-in: the decoder has a single input (the latents after
`post_quant_conv`) and no per-call options, so it is converted ONCE with batch, height and width left free, then
compiled once per input shape, after the graph is reshaped to that static shape (the CPU plugin then picks the
kernels a graph traced at that shape gets, and the same outputs; a graph compiled with free shapes ran slower in
a small test). Plain decoding, `enable_slicing()` (batch 1) and `enable_tiling()` (one compiled shape per tile
size) all work, and a new shape never needs tracing again.

So the eager decoder's weights are not needed after conversion, and `use_openvino_vae_decoder` releases them
(`vae.decoder` is replaced; nothing else in lcmkit holds the eager decoder): with a cache folder each shape's
static graph is saved as IR beside the free-shape one and compiled from its file (the free-shape IR is read only
for a new shape), so the stand-in holds no torch tensor; without one, the graph's constants are the torch
weights themselves (shared, not copied). Each compiled shape holds its own weights in the CPU plugin's layout and
its activation buffers (about 1.7x the decoder's fp32 weights per shape, measured on a 47 MB decoder at small
sizes), so a server that sees many sizes pays per size. The rest of the VAE stays eager: `vae.encode`, `post_quant_conv`, `vae.dtype` / `vae.device` (read from
the encoder's parameters), slicing and tiling. What that costs: the converted VAE's `state_dict()` (and so
`save_pretrained`) refuses, since the decoder's weights are gone; save before converting. What the conversion
fixes: the weights (the graph always upsamples as the reference does: `enable_subpixel_upsampling()` and
`disable_...` change the eager decoder only).

The data-free precisions ("fp32", "fp16-weights", "int8-weights") need nothing else; "int8" (activations too)
needs `calibration=`: decoder inputs (latents after `post_quant_conv`), which the fast mode records at the size it
compiles (`lcmkit.accel.int8`), and `add` routes that size to the quantized graph.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lcmkit.accel import graphs
from lcmkit.accel.per_shape import default_cache_dir, use_openvino_unet
from lcmkit.models.vae import AutoencoderKL

logger = logging.getLogger(__name__)


def decoder_source(vae: AutoencoderKL, *, sampled_key: bool = False) -> graphs.GraphSource:
    """The decoder with batch, height and width free. Traced, its upsamplers take the reference form (nearest 2x,
    then the conv) whatever their sub-pixel switches (`lcmkit.nn.fast.upsample_subpixel`)."""
    c = vae.config.latent_channels
    return graphs.GraphSource(
        name="vae-decoder",
        module=vae.decoder,
        traced=vae.decoder,
        inputs={"z": (-1, c, -1, -1)},
        example=(torch.zeros(1, c, 8, 8),),
        output="sample",
        description=repr((vae.config, "upsamplers: nearest 2x then conv")),
        sampled_key=sampled_key,
        keep_float=float_layers(vae.decoder),
    )


# int8 keeps the last, full-resolution up block and the output conv in float: their rounding reaches the pixels
# directly. SD1.5 decoder at 512², bf16 arithmetic elsewhere: largest pixel error of int8 against eager 0.036
# (43.2 dB) with them quantized, 0.031 (44.7 dB) kept, for 2% more time than all-int8 (1.25 s against 1.23 s).
def float_layers(decoder: nn.Module) -> tuple[str, ...]:
    return (rf".*\.up_blocks\.{len(decoder.up_blocks) - 1}\..*", r".*\.conv_out/.*")


def _check_vae(vae: Any) -> None:
    if not isinstance(vae, AutoencoderKL):
        raise ValueError(
            f"the OpenVINO VAE decoder replaces the decoder of an AutoencoderKL, got {type(vae).__name__}; "
            "a tiny VAE (AutoencoderTiny) is already cheap and stays eager"
        )
    if isinstance(vae.decoder, OpenVINOVAEDecoder):
        raise ValueError("this VAE's decoder is already an OpenVINO one; there is nothing left to convert")
    weight = next(vae.decoder.parameters())
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        raise ValueError(
            f"the OpenVINO VAE decoder runs float32 on the CPU; this decoder is {weight.dtype} on "
            f"{weight.device}. Load the pipeline in float32 on the CPU"
        )


class OpenVINOVAEDecoder(nn.Module):
    """Stands in for `vae.decoder` (latents after `post_quant_conv` -> image): one OpenVINO graph converted at
    construction, compiled once per input shape (batch, channels, height, width) on first use.

    Inputs are moved to CPU float32; the image comes back on the input's device and dtype. No autograd.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        *,
        precision: str = "fp32",
        cache_dir: str | Path | None = None,
        threads: int | None = None,
        inference: str = "f32",
        sampled_key: bool = False,
        calibration: graphs.Calibration = None,
    ) -> None:
        super().__init__()
        quantized = precision in graphs.NEEDS_CALIBRATION and calibration is not None
        if precision not in graphs.DATA_FREE_PRECISIONS and not quantized:
            raise ValueError(
                f"precision {precision!r} is not available for the VAE decoder; allowed: "
                f"{list(graphs.DATA_FREE_PRECISIONS)}, or {list(graphs.NEEDS_CALIBRATION)} with calibration= "
                "(decoder inputs: latents after post_quant_conv)"
            )
        ov = graphs.import_openvino()  # a missing package fails here, before any work
        if precision in graphs.NEEDS_NNCF:
            graphs.import_nncf()
        _check_vae(vae)
        graphs.check_threads(threads)
        self.latent_channels: int = vae.config.latent_channels
        self.precision = precision
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.threads = threads
        self.inference = inference
        started = time.perf_counter()
        source = decoder_source(vae, sampled_key=sampled_key)
        self._model: Any = None
        self._ir: Path | None = None
        if self.cache_dir is not None:
            # the IR's path: each shape's static graph is saved beside it and compiled from its file (OpenVINO
            # then finds the compiled blob without reading the graph); the IR itself is read only for a new shape
            self._ir = Path(
                graphs.load_or_build(ov, source, precision, calibration, self.cache_dir, as_path=True)
            )
        else:  # no file to read back: the graph's constants are the eager weights, kept alive by the graph
            self._model = graphs.load_or_build(ov, source, precision, calibration, None)
        logger.info("OpenVINO VAE decoder (%s) ready after %.1f s", precision, time.perf_counter() - started)
        self._requests: dict[tuple[int, int, int, int], Any] = {}

    @property
    def compiled_shapes(self) -> list[tuple[int, int, int, int]]:
        """(batch, channels, latent height, latent width) of every graph compiled so far."""
        return sorted(self._requests)

    def extra_repr(self) -> str:
        return f"precision={self.precision!r}, compiled={self.compiled_shapes}"

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Decode `z` (B, latent_channels, h, w) on the graph compiled for its shape, compiling it if new."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels or min(z.shape) < 1:
            raise ValueError(
                f"the OpenVINO VAE decoder takes latents (batch, {self.latent_channels}, height, width), got "
                f"{tuple(z.shape)}"
            )
        out = self.prepare(tuple(z.shape)).infer([graphs.to_numpy(z)])[0]
        return torch.from_numpy(np.array(out, copy=True)).to(device=z.device, dtype=z.dtype)

    def prepare(self, shape: tuple[int, int, int, int]) -> Any:
        """The inference request for latents of `shape` (batch, channels, height, width), compiled if new."""
        return self._requests.get(shape) or self._compile_for(shape)

    def add(self, shape: tuple[int, int, int, int], request: Any) -> None:
        """Decode latents of `shape` with `request` (another decoder's, e.g. an int8 one calibrated for that size)."""
        self._requests[shape] = request

    def _compile_for(self, shape: tuple[int, int, int, int]) -> Any:
        ov = graphs.import_openvino()
        logger.info("compiling the OpenVINO VAE decoder (%s) for latents %s", self.precision, shape)
        if self._ir is None:
            model = self._model.clone()
            model.reshape({0: ov.PartialShape(list(shape))})
        else:
            model = self._ir.with_name(f"{self._ir.stem}-{'x'.join(map(str, shape))}.xml")
            if not model.exists():
                static = ov.Core().read_model(self._ir)
                static.reshape({0: ov.PartialShape(list(shape))})
                ov.save_model(static, model, compress_to_fp16=False)
            model = str(model)
        compiled = graphs.compile_graph(ov, model, self.threads, self.cache_dir, inference=self.inference)
        request = compiled.create_infer_request()
        self._requests[shape] = request
        return request

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        raise ValueError(
            "the VAE decoder runs on OpenVINO and its eager weights were released, so this VAE cannot be saved; "
            "save it before use_openvino_vae_decoder, or load the model folder again"
        )


def use_openvino_vae_decoder(
    pipe_or_vae: Any,
    precision: str = "fp32",
    cache_dir: str | Path | None = None,
    threads: int | None = None,
) -> OpenVINOVAEDecoder:
    """Replace `vae.decoder` (of `pipe.vae`, or of the AutoencoderKL given) with an `OpenVINOVAEDecoder` and
    release the eager decoder; returns the stand-in.

    It converts now (or reads the graph from `cache_dir`, default `default_cache_dir()`, where the next process
    finds it) and compiles per latent shape on first use. Only the full AutoencoderKL converts: a tiny VAE stays
    eager. The pipeline must run float32 on the CPU.
    """
    vae = getattr(pipe_or_vae, "vae", pipe_or_vae)
    stand_in = OpenVINOVAEDecoder(
        vae,
        precision=precision,
        cache_dir=cache_dir if cache_dir is not None else default_cache_dir(),
        threads=threads,
    )
    vae.decoder = stand_in  # the only reference lcmkit held to the eager decoder
    return stand_in


def use_openvino(pipe: Any, precision: str = "fp32", cache_dir: str | Path | None = None) -> None:
    """What `--openvino` does on the CLI and the server: the UNet through OpenVINO (`use_openvino_unet`, per image
    size) and, when the pipeline decodes with the full AutoencoderKL, its decoder too. A tiny VAE stays eager: it is
    already cheap, and it is not an AutoencoderKL."""
    use_openvino_unet(pipe, precision, cache_dir=cache_dir)
    if isinstance(pipe.vae, AutoencoderKL):
        use_openvino_vae_decoder(pipe, precision, cache_dir=cache_dir)
