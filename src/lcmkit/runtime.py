"""`FastPaths`: every exact-mode fast path of the torch models in one frozen options object.

Each field names one way lcmkit computes the same function as the reference (diffusers' layers) faster on the CPU.
Some are bitwise the same as the reference arithmetic, the others sum in another order and agree to float rounding
(about 1e-5 relative); `docs/performance.md` has the measurements. `FastPaths.reference()` turns every one off,
`FastPaths.default()` is what a pipeline or model uses unless told otherwise:

    pipe.set_fast_paths(FastPaths.reference())           # the reference arithmetic, in one call
    pipe = LatentConsistencyModelPipeline.from_pretrained(path, fast_paths=FastPaths.default())
    pipe.set_fast_paths(dataclasses.replace(pipe.fast_paths, conv_winograd="off"))

Combinations where one path would silently switch another off raise a `ValueError` naming both. `backend`
"openvino" (`FastPaths.fast()`, `from_pretrained(..., fast=True)`, `--fast` on the CLI and server) hands the text
encoder, the UNet and the VAE decoder to `lcmkit.accel.enable_fast`: compiled OpenVINO graphs at the precision the
CPU's flags pick, cached on disk. It is not exact mode (float32 agrees to rounding; bf16/int8 do not), and the torch
fields still apply to what stays in torch (the VAE encoder of img2img, a tiny VAE).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

Mode = Literal["auto", "always", "off"]
MODES: tuple[str, ...] = ("auto", "always", "off")
MemoryFormat = Literal["auto", "channels_last", "contiguous"]
MEMORY_FORMATS: tuple[str, ...] = ("auto", "channels_last", "contiguous")
Choose = Literal["probe", "thresholds"]
CHOOSE: tuple[str, ...] = ("probe", "thresholds")
Backend = Literal["torch", "openvino"]
BACKENDS: tuple[str, ...] = ("torch", "openvino")

_CHOICES: dict[str, tuple[str, ...]] = {
    "backend": BACKENDS,
    "choose": CHOOSE,
    "conv_prepack": MODES,
    "conv_winograd": MODES,
    "vae_memory_format": MEMORY_FORMATS,
    "unet_subpixel": MODES,
    "vae_subpixel": MODES,
}


@dataclass(frozen=True)
class FastPaths:
    """Which fast paths the UNet, the VAE and the pipeline take (see `lcmkit.nn.fast` for each one's arithmetic).

    - `backend`: "torch" (exact mode: our PyTorch models with the paths below) or "openvino" (the fast mode,
      `lcmkit.accel.enable_fast`; once applied to a pipeline it cannot go back to "torch": load it again).
    - `choose`: how the "auto" fields below decide, per layer and input shape, whether their path runs. "probe"
      (the default): the first time a layer meets a shape, the reference op and the fast one are timed on it, on
      this machine, and the faster is kept (`lcmkit.nn.probe`: in memory for the process, on disk for later ones,
      keyed by CPU, torch version and thread count); where nothing can be timed (graph capture, autograd, another
      device or dtype) and outside the shapes a path could pay on, the fixed thresholds of `lcmkit.nn.fast` apply.
      "thresholds": those fixed thresholds only (measured on one VM; the same choice on every machine). Each path
      keeps its tolerance either way, but two machines (or runs) may pick differently, so the image can differ
      between them by a path's rounding (~1e-5): pin the fields (or choose "thresholds") to compare bitwise.

    - `conv_prepack`: 3x3 convolutions on small maps use a weight pre-packed in oneDNN's layout. "auto": only
      memory-mapped weights (whose file pages are released in exchange, so it costs no memory); "always": in-memory
      weights too; "off": never. Which map sizes count as small is probed (or the threshold, 32x32 pixels).
    - `conv_winograd`: large 3x3 convolutions with many channels take NNPACK's Winograd transform. "auto": where it
      measured faster (probed against oneDNN in the layout the layer would otherwise run); "always": every eligible
      convolution; "off": never. Rounds differently (~1e-5 relative).
    - `residual_into_conv`: a resnet block's second convolution adds its result straight into the residual (one
      oneDNN convolution with a sum post-op) instead of into a fresh tensor. Bitwise the same in our tests.
    - `inplace_activations`: a resnet block's SiLUs and adds reuse the tensors it just made (without autograd).
      Bitwise the same.
    - `fused_projections`: a spatial transformer's 1x1 in/out projections run as matrix products on the map's
      memory, with the residual summed into the product. Same values up to rounding.
    - `vae_memory_format`: how the VAE lays out its feature maps. "auto": channels-last on the CPU in float32,
      except levels whose convolutions take the Winograd path (with `choose="probe"`, each level's layout is the
      faster for its first convolution); "channels_last" / "contiguous" force one layout.
    - `unet_subpixel` / `vae_subpixel`: nearest-2x-then-conv upsamplers run in sub-pixel form (no 4x upsampled
      copy, 16 instead of 36 multiply-adds). "auto": where it pays (probed; by threshold, inputs of at least 32x32
      pixels); "always"; "off". Traced or compiled graphs get the reference form in every mode.
    - `weight_paging`: the pipeline hands each model's memory-mapped weight pages back to the OS after its stage.
      Changes no arithmetic.
    """

    backend: Backend = "torch"
    choose: Choose = "probe"
    conv_prepack: Mode = "auto"
    conv_winograd: Mode = "auto"
    residual_into_conv: bool = True
    inplace_activations: bool = True
    fused_projections: bool = True
    vae_memory_format: MemoryFormat = "auto"
    unet_subpixel: Mode = "auto"
    vae_subpixel: Mode = "always"
    weight_paging: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            allowed = _CHOICES.get(f.name, (True, False))
            if value not in allowed or (f.name not in _CHOICES and not isinstance(value, bool)):
                raise ValueError(f"FastPaths.{f.name}={value!r} is not one of {allowed}")
        if self.vae_memory_format == "channels_last" and self.conv_winograd != "off":
            raise ValueError(
                f"FastPaths.vae_memory_format='channels_last' with conv_winograd={self.conv_winograd!r}: the "
                "Winograd path runs on plain NCHW maps only, so a VAE forced channels-last never takes it; set "
                "conv_winograd='off' (or vae_memory_format='auto', which keeps Winograd levels NCHW)"
            )

        if self.residual_into_conv and self.conv_prepack == "off":
            raise ValueError(
                "FastPaths.residual_into_conv=True with conv_prepack='off': the convolution summed into the residual "
                "is oneDNN's, and conv_prepack='off' keeps every convolution on plain F.conv2d; set "
                "residual_into_conv=False too (or conv_prepack='auto')"
            )

    @classmethod
    def default(cls) -> FastPaths:
        """Every fast path where it measured faster: what pipelines and models use unless told otherwise."""
        return cls()

    @classmethod
    def reference(cls) -> FastPaths:
        """Every fast path off: the reference arithmetic (diffusers' layers, summed in its order)."""
        return cls(
            choose="thresholds",
            conv_prepack="off",
            conv_winograd="off",
            residual_into_conv=False,
            inplace_activations=False,
            fused_projections=False,
            vae_memory_format="contiguous",
            unet_subpixel="off",
            vae_subpixel="off",
            weight_paging=False,
        )

    @classmethod
    def fast(cls) -> FastPaths:
        """The fast mode: OpenVINO runs the text encoder, UNet and VAE decoder (`lcmkit.accel.enable_fast`, precision
        picked from the CPU's flags); the torch paths stay at their defaults for whatever remains in torch."""
        return cls(backend="openvino")

    @classmethod
    def chosen(cls, fast: bool, fast_paths: FastPaths | None) -> FastPaths | None:
        """What a loader's `fast=` / `fast_paths=` pair asks for: `fast=True` is `FastPaths.fast()`, and refuses
        a `fast_paths` on the torch backend rather than silently picking one of the two."""
        if not fast:
            return fast_paths
        if fast_paths is not None and fast_paths.backend != "openvino":
            raise ValueError(
                f"fast=True asks for the OpenVINO backend but fast_paths has backend={fast_paths.backend!r}; "
                "pass one of them"
            )
        return fast_paths or cls.fast()
