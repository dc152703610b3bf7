"""Opt-in accelerated runtimes for the models. Nothing here is used unless asked for.

`enable_fast(pipe)` is the fast mode in one call (`--fast` on the CLI and the server): the text encoder, UNet and
VAE decoder on OpenVINO at the precision this CPU runs fastest (`choose_precision`), cached on disk.

`openvino_unet(pipe.unet, ...)` converts the UNet to an OpenVINO graph compiled for this CPU (fp32, or int8
through NNCF) and returns a drop-in replacement for `pipe.unet`; `use_openvino_unet(pipe)` installs one that
converts per image size on first use; `use_openvino_vae_decoder(pipe)` puts the full VAE's decoder on OpenVINO
too (fp32: the eager image up to rounding), compiled per latent shape. The CLI's and the server's `--openvino`
install both. Names load lazily, and `openvino` itself is imported only when a conversion is requested, so
`import lcmkit.accel` never needs it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "openvino_unet": "lcmkit.accel.openvino",
    "OpenVINOUNet": "lcmkit.accel.openvino",
    "UNetInputs": "lcmkit.accel.openvino",
    "collect_unet_inputs": "lcmkit.accel.openvino",
    "PRECISIONS": "lcmkit.accel.openvino",
    "OpenVINOUNetPerShape": "lcmkit.accel.per_shape",
    "use_openvino_unet": "lcmkit.accel.per_shape",
    "OpenVINOVAEDecoder": "lcmkit.accel.vae_decoder",
    "use_openvino_vae_decoder": "lcmkit.accel.vae_decoder",
    "use_openvino": "lcmkit.accel.vae_decoder",
    "OpenVINOTextEncoder": "lcmkit.accel.text_encoder",
    "enable_fast": "lcmkit.accel.fast",
    "FastMode": "lcmkit.accel.fast",
    "FAST_PRECISIONS": "lcmkit.accel.cpu",
    "PRECISION_RULES": "lcmkit.accel.cpu",
    "choose_precision": "lcmkit.accel.cpu",
    "cpu_flags": "lcmkit.accel.cpu",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lcmkit.accel' has no attribute {name!r}")
