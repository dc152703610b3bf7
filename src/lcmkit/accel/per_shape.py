"""An OpenVINO UNet for any image size: converts the eager UNet once per latent size, on first use.

`openvino_unet` compiles one fixed shape, which suits a script that always makes the same size. The CLI and the
server take whatever size each request names, so they install `OpenVINOUNetPerShape` instead: a stand-in for
`pipe.unet` that keeps the eager UNet, converts it for a new (latent height, latent width, text length) the first
time a call has that shape (cached on disk with `cache_dir`, so a restart reads the IR back), and sends every
later call of that shape to the compiled graph. Batches of any size run as batch-1 compiled calls.

Only the data-free precisions are offered here ("fp32", "fp16-weights", "int8-weights"): the activation-quantizing ones need
calibration inputs recorded at the size they will run at (see `openvino_unet(calibration=...)`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lcmkit.accel.graphs import DATA_FREE_PRECISIONS, import_openvino
from lcmkit.accel.openvino import OpenVINOStandIn, OpenVINOUNet, check_unet, openvino_unet
from lcmkit.models.unet import UNet2DConditionOutput

logger = logging.getLogger(__name__)

CACHE_ENV = "LCMKIT_OPENVINO_CACHE"


def default_cache_dir() -> Path:
    """Where converted graphs are kept: $LCMKIT_OPENVINO_CACHE, else ~/.cache/lcmkit/openvino."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lcmkit" / "openvino")


class OpenVINOUNetPerShape(OpenVINOStandIn):
    """Stands in for `pipe.unet`; one compiled OpenVINO UNet per latent size and text length, made on demand."""

    def __init__(
        self,
        unet: nn.Module,
        *,
        precision: str = "fp32",
        cache_dir: str | Path | None = None,
        threads: int | None = None,
        vae_scale_factor: int = 8,
        batch_size: int = 1,
        inference: str = "f32",
        sampled_key: bool = False,
    ) -> None:
        if precision not in DATA_FREE_PRECISIONS:
            raise ValueError(
                f"precision {precision!r} is not available per shape; allowed: {list(DATA_FREE_PRECISIONS)} "
                "(int8 activations need calibration data: use lcmkit.accel.openvino_unet(calibration=...))"
            )
        import_openvino()  # a missing package fails here, before any image is made
        check_unet(unet)
        self._eager = unet.eval()
        self.config = unet.config
        self.precision = precision
        self.cache_dir = cache_dir
        self.threads = threads
        self.vae_scale_factor = vae_scale_factor
        self.batch_size = batch_size
        self.inference = inference
        self.sampled_key = sampled_key
        self._compiled: dict[tuple[int, int, int, int], OpenVINOUNet] = {}

    @property
    def compiled_shapes(self) -> list[tuple[int, int, int]]:
        """(latent height, latent width, text tokens) of every graph compiled so far."""
        return sorted({key[1:] for key in self._compiled})

    def __repr__(self) -> str:
        return f"OpenVINOUNetPerShape(precision={self.precision!r}, compiled={self.compiled_shapes})"

    def prepare(
        self, latent_height: int, latent_width: int, text_tokens: int, batch: int = 1
    ) -> OpenVINOUNet:
        """The compiled graph for calls of this shape (batch rows per compiled call), converting it if new."""
        key = (batch, latent_height, latent_width, text_tokens)
        if key not in self._compiled:
            logger.info(
                "converting the UNet to OpenVINO (%s) for %dx%d latents, batch %d",
                self.precision,
                latent_height,
                latent_width,
                batch,
            )
            self._compiled[key] = openvino_unet(
                self._eager,
                batch_size=batch,
                height=latent_height * self.vae_scale_factor,
                width=latent_width * self.vae_scale_factor,
                precision=self.precision,
                cache_dir=self.cache_dir,
                threads=self.threads,
                text_tokens=text_tokens,
                vae_scale_factor=self.vae_scale_factor,
                inference=self.inference,
                sampled_key=self.sampled_key,
            )
        return self._compiled[key]

    def add(self, graph: OpenVINOUNet) -> None:
        """Send calls of `graph`'s shape to it (an int8 graph calibrated for that size, say) instead of converting."""
        h, w = graph.latent_size
        self._compiled[(graph.batch_size, h, w, graph.text_tokens)] = graph

    def forward(
        self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, **kwargs: Any
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        """Run the compiled graph for this call's shape, converting the eager UNet first if it is new. Calls whose
        batch is a multiple of `batch_size` run `batch_size` rows per compiled call, others one row at a time."""
        if sample.ndim != 4 or encoder_hidden_states.ndim != 3:
            raise ValueError(
                f"expected latents (B, C, H, W) and text states (B, T, D), got {tuple(sample.shape)} and "
                f"{tuple(encoder_hidden_states.shape)}"
            )
        batch = self.batch_size if sample.shape[0] % self.batch_size == 0 else 1
        graph = self.prepare(sample.shape[2], sample.shape[3], encoder_hidden_states.shape[1], batch)
        return graph.forward(sample, timestep, encoder_hidden_states, **kwargs)


def use_openvino_unet(
    pipe: Any, precision: str = "fp32", cache_dir: str | Path | None = None, threads: int | None = None
) -> OpenVINOUNetPerShape:
    """Replace `pipe.unet` with an `OpenVINOUNetPerShape` of it (CPU, float32 pipelines only); returns it.

    Converted graphs are kept in `cache_dir` (default: `default_cache_dir()`), so the next process reads them back."""
    if pipe.device.type != "cpu" or pipe.dtype != torch.float32:
        raise ValueError(
            f"the OpenVINO UNet runs float32 on the CPU; this pipeline is {pipe.dtype} on {pipe.device}"
        )
    pipe.unet = OpenVINOUNetPerShape(
        pipe.unet,
        precision=precision,
        cache_dir=cache_dir if cache_dir is not None else default_cache_dir(),
        threads=threads,
        vae_scale_factor=pipe.vae_scale_factor,
    )
    return pipe.unet
